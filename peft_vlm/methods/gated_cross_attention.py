"""Flamingo's gated cross-attention (Alayrac et al., arXiv 2204.14198 sec 2.2): new blocks between frozen LM layers.

Before every `every`-th decoder layer (layers 0, n, 2n, ...), a new block lets the text read the images: a
cross-attention from the hidden states to the connector's visual tokens, then a feed-forward layer, each output
scaled by tanh(alpha) with alpha = 0, so at start the block adds exactly zero and the model is unchanged.

Each position attends only to the image that precedes it, the most recent one in its row (Flamingo's per-image
masking, sec 2.3); the tokens of an image attend to that image, positions before any image attend to nothing and
get no cross-attention output. During cached generation every new token follows the whole prompt, so it attends
to its row's last image. With the perceiver resampler as connector (`connector="perceiver_resampler"`) and
`visual_tokens_in_sequence=False` this is Flamingo's design: the images reach the text only through the blocks, and
every position attends to its row's last image. The default, True, also keeps the visual tokens in the sequence
where the images were placed (the layout adapters were first trained with); out of the sequence, a row of 30 text
tokens no longer carries the resampler's 64 latents through every frozen layer.

The block runs from a forward pre-hook on the decoder layer, rewriting its input hidden states: no code of
`transformers` is copied and the KV cache of the frozen layers is untouched.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from peft_vlm.errors import ConfigError
from peft_vlm.methods.registry import Method, register
from peft_vlm.runtime.lm_layers import decoder_layers, hidden_dtype, hidden_size, layer_device
from peft_vlm.runtime.token_context import IMAGE
from peft_vlm.runtime.tracking import state_of


@dataclass
class GatedCrossAttentionConfig:
    """A gated cross-attention + feed-forward block before every `every`-th decoder layer (Flamingo-9B: every 4th).
    `heads` defaults to the LM's attention heads; the feed-forward layer is `ff_mult` times the LM's width."""

    every: int = 4
    heads: int | None = None
    ff_mult: int = 4
    group: str = "vision"
    visual_tokens_in_sequence: bool = True

    def __post_init__(self):
        if self.every < 1 or self.ff_mult < 1 or (self.heads is not None and self.heads < 1):
            raise ConfigError(f"GatedCrossAttentionConfig needs every, ff_mult and heads >= 1, got {self}")


def preceding_image(context, visual: torch.Tensor, owner: torch.Tensor, rows: int, length: int) -> torch.Tensor:
    """(rows, length): global index of the image each position attends to, -1 where no image precedes it."""
    tokens_per_image = visual.shape[1]
    per_row = torch.bincount(owner, minlength=rows)
    if len(per_row) > rows:
        raise ConfigError(f"the images belong to {len(per_row)} batch rows but the call has {rows}")
    first = torch.cumsum(per_row, 0) - per_row  # images are numbered in reading order, row by row
    types = context.types_for((rows, length))
    if types is not None and bool((types == IMAGE).any()):
        is_image = types.to(owner.device) == IMAGE
        starts = is_image & ((is_image.cumsum(1) - 1) % tokens_per_image == 0)  # first token of each image
        local = starts.cumsum(1) - 1
    else:  # a cached decoding step, or images outside the sequence: every token follows all of its row's images
        local = (per_row - 1)[:, None].expand(rows, length)
    target = torch.where(local >= 0, first[:, None] + local, -1)
    packed = context.visual.sequence_ids
    if packed is not None and tuple(packed.shape) == (rows, length):  # packed rows: the sample's own images only
        sample, image_sample = packed.to(owner.device), context.visual.image_sequences.to(owner.device)
        if types is None or not bool((types == IMAGE).any()):  # images outside the sequence: the sample's last
            last = torch.full((int(max(sample.max(), image_sample.max())) + 1,), -1, device=owner.device)
            last = last.scatter_reduce(0, image_sample, torch.arange(len(owner), device=owner.device), "amax")
            return torch.where(sample >= 0, last[sample.clamp(min=0)], -1)
        # the row's most recent image is the sample's own, or the sample has none before this position
        return torch.where((target >= 0) & (image_sample[target.clamp(min=0)] == sample), target, -1)
    return target


class GatedCrossAttentionBlock(nn.Module):
    """Flamingo's GATED XATTN-DENSE block, fed with the visual tokens of the call (`context.visual`)."""

    def __init__(self, context, hidden: int, heads: int, ff_mult: int, device, dtype) -> None:
        super().__init__()
        if hidden % heads:
            raise ConfigError(f"gated cross-attention: {heads} heads do not divide the LM's width {hidden}")
        self.context, self.heads = context, heads
        with torch.device(device):
            self.norm = nn.LayerNorm(hidden)
            self.query = nn.Linear(hidden, hidden, bias=False)
            self.key_value = nn.Linear(hidden, 2 * hidden, bias=False)
            self.output = nn.Linear(hidden, hidden, bias=False)
            self.feed_forward = nn.Sequential(
                nn.LayerNorm(hidden), nn.Linear(hidden, ff_mult * hidden), nn.GELU(),
                nn.Linear(ff_mult * hidden, hidden),
            )
            self.attention_gate = nn.Parameter(torch.zeros(1))  # alpha = 0: tanh(alpha) = 0 at start
            self.feed_forward_gate = nn.Parameter(torch.zeros(1))
        self.to(dtype)

    def cross_attention(self, x: torch.Tensor) -> torch.Tensor:
        visual, owner = self.context.visual.visual_tokens, self.context.visual.image_owner
        rows, length, hidden = x.shape
        images, count = visual.shape[:2]
        target = preceding_image(self.context, visual, owner.to(x.device), rows, length)
        key_image = torch.arange(images, device=x.device).repeat_interleave(count)
        has_image = target >= 0
        # Positions with no image attend to everything (a finite softmax) and are zeroed below: never NaN.
        mask = (target[:, :, None] == key_image) | ~has_image[:, :, None]
        split = (rows, length, self.heads, hidden // self.heads)
        query = self.query(self.norm(x)).view(split).transpose(1, 2)
        keys, values = self.key_value(visual.to(x.device, x.dtype).reshape(1, images * count, hidden)).chunk(2, -1)
        keys, values = (t.view(1, -1, *split[2:]).transpose(1, 2).expand(rows, -1, -1, -1) for t in (keys, values))
        attended = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask[:, None])
        attended = self.output(attended.transpose(1, 2).reshape(rows, length, hidden))
        return attended * has_image[..., None].to(attended.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.context.visual.visual_tokens is not None:
            x = x + torch.tanh(self.attention_gate) * self.cross_attention(x)  # eq. (1): y = y + tanh(a) xattn(y, x)
        return x + torch.tanh(self.feed_forward_gate) * self.feed_forward(x)  # y = y + tanh(b) ffw(y)


def _run_before(layer: nn.Module, block: GatedCrossAttentionBlock) -> None:
    def pre_hook(module, args, kwargs):
        if args:
            return (block(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": block(kwargs["hidden_states"])}

    layer.register_forward_pre_hook(pre_hook, with_kwargs=True)


@register
class GatedCrossAttentionMethod(Method):
    name = "gated_cross_attention"
    config_class = GatedCrossAttentionConfig
    needs_vision = True

    @property
    def images_in_sequence(self) -> bool:
        return self.config.visual_tokens_in_sequence

    def packing_refusal(self) -> str | None:
        return None  # packed, each position attends to its own sample's images (`preceding_image`)

    def attach(self, model: nn.Module, language_model: nn.Module) -> dict[str, list[nn.Parameter]]:
        context = state_of(model).context
        hidden, dtype = hidden_size(language_model), hidden_dtype(language_model)
        heads = self.config.heads or language_model.config.num_attention_heads
        parameters = []
        for layer in decoder_layers(language_model)[:: self.config.every]:
            block = GatedCrossAttentionBlock(context, hidden, heads, self.config.ff_mult, layer_device(layer), dtype)
            layer.add_module("gated_cross_attention", block)
            _run_before(layer, block)
            parameters += list(block.parameters())
        return {self.config.group: parameters}
