"""LLaMA-Adapter V2 visual fusion, in the two forms that exist: the paper's early fusion and the official code's.

`EarlyFusionConfig` (paper, arXiv 2304.15010 sec 4.3): the connector's visual tokens enter only the first `layers`
layers, where every query attends to its row's visual tokens through the layer's frozen key/value projections, in
its own softmax, scaled per head by a zero-initialised gate tanh(g). The late layers keep their adaption prompts
for language only, so visual and language knowledge do not compete in the same layers.

`VisualQueryPromptConfig` (the official V2 release, `llama_adapter_v2_multimodal7b`): learnable query tokens read
the image's patch tokens through a small transformer, are projected to the LM's width, and the resulting visual
query is added to the adaption prompts of the late layers (all but the first in the release). It changes the
adaption prompts, so it is applied after an `AdaptionPromptConfig` with the same `length`.

Which one to use: the paper's early fusion keeps the late prompts text-only (joint training with disjoint groups,
sec 4.2, relies on that); the official variant is what the released checkpoints were trained with.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peft_vlm.attention import AttentionCall, add_extension, attention_modules, gated_token_attention
from peft_vlm.errors import ConfigError, IncompatibleMethodsError
from peft_vlm.methods.adaption_prompt import (
    AdaptionPromptMethod,
    VisualPromptOffset,
    hidden_dtype,
    hidden_size,
    layer_device,
)
from peft_vlm.plugins import Method, register
from peft_vlm.state import state_of


@dataclass
class EarlyFusionConfig:
    """The visual tokens enter the first `layers` layers through zero-init gated attention (V2 sec 4.3)."""

    layers: int = 1
    # The paper's design (default) feeds the visual tokens to the first layers only, not as tokens of the sequence.
    # True also splices them into the sequence (LLaVA's layout), so every layer sees them as tokens as well.
    visual_tokens_in_sequence: bool = False

    def __post_init__(self):
        if self.layers < 1:
            raise ConfigError(f"EarlyFusionConfig needs layers >= 1, got {self.layers}")


class EarlyFusion(nn.Module):
    """One early layer's per-head gates; runs as an attention extension of that layer."""

    def __init__(self, context, heads: int, device, dtype) -> None:
        super().__init__()
        self.context = context
        self.gate = nn.Parameter(torch.zeros(heads, device=device, dtype=dtype))  # g = 0: tanh(g) = 0 at start

    def forward(self, call: AttentionCall) -> torch.Tensor | None:
        extras = self.context.extras
        if "visual_tokens" not in extras:
            return None
        rows = call.query.shape[0]
        tokens, mask, has_image = visual_tokens_by_row(extras["visual_tokens"], extras["image_owner"], rows)
        # Rows without an image attend to placeholder tokens, then get exactly zero: no visual contribution.
        addition = gated_token_attention(call, tokens, self.gate, mask)
        return addition * has_image.to(addition.dtype).view(-1, 1, 1, 1)


def visual_tokens_by_row(visual: torch.Tensor, owner: torch.Tensor, rows: int):
    """(images, tokens, hidden) -> (rows, max images x tokens, hidden), a mask of the real tokens, and which rows
    have an image (rows without one get an all-True mask so that their softmax stays finite)."""
    images, count, hidden = visual.shape
    per_row = torch.bincount(owner, minlength=rows)
    if len(per_row) > rows:
        raise ConfigError(f"the images belong to {len(per_row)} batch rows but the call has {rows}")
    slots = int(per_row.max())
    # slot of each image within its row, in reading order
    order = torch.arange(images, device=owner.device) - (torch.cumsum(per_row, 0) - per_row)[owner]
    tokens = visual.new_zeros(rows, slots, count, hidden)
    tokens[owner, order] = visual
    mask = torch.arange(slots, device=owner.device)[None, :] < per_row[:, None]
    has_image = per_row > 0
    mask = (mask | ~has_image[:, None]).repeat_interleave(count, dim=1)
    return tokens.view(rows, slots * count, hidden), mask, has_image


@register
class EarlyFusionMethod(Method):
    name = "early_fusion"
    config_class = EarlyFusionConfig
    needs_vision = True

    def attach(self, model: nn.Module, language_model: nn.Module) -> dict[str, list[nn.Parameter]]:
        takes_images_out = not self.config.visual_tokens_in_sequence
        if takes_images_out and "visual_expert" in state_of(model).names():  # refused before the model is touched
            raise IncompatibleMethodsError("the visual expert needs image tokens in the sequence; early fusion with "
                                           "visual_tokens_in_sequence=False takes them out")
        context, dtype = state_of(model).context, hidden_dtype(language_model)
        heads = language_model.config.num_attention_heads
        parameters = []
        for module in attention_modules(language_model)[: self.config.layers]:
            fusion = EarlyFusion(context, heads, layer_device(module), dtype)
            module.add_module("early_fusion", fusion)
            add_extension(language_model, module, fusion)
            parameters.append(fusion.gate)
        if takes_images_out:
            model.images_in_sequence = False
        return {"vision": parameters}


@dataclass
class VisualQueryPromptConfig:
    """The official V2 code's visual query: `depth` transformer blocks of width `width` over the projected patch
    tokens and the adaption prompts' `length` learnable queries (defaults as released: 8 blocks, 768 wide, 16 heads).
    """

    width: int = 768
    depth: int = 8
    heads: int = 16


class VisualQuery(VisualPromptOffset):
    """Patch tokens -> (images, length, hidden): the query tokens' outputs after the blocks, projected and normed."""

    def __init__(
        self, context, config: VisualQueryPromptConfig, vision_width: int, length: int, hidden: int, device, dtype
    ):
        super().__init__(context)
        width = config.width
        with torch.device(device):
            self.patch_projection = nn.Sequential(nn.Linear(vision_width, width), nn.LayerNorm(width))
            self.queries = nn.Parameter(torch.randn(length, width) * 0.02)
            block = dict(d_model=width, nhead=config.heads, dim_feedforward=4 * width, dropout=0.0,
                         activation="gelu", batch_first=True, norm_first=True)
            self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(**block) for _ in range(config.depth))
            self.output_projection = nn.Sequential(nn.Linear(width, hidden), nn.LayerNorm(hidden))
        self.to(dtype)

    def per_image(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        queries = self.queries.expand(patch_tokens.shape[0], -1, -1)
        x = torch.cat([self.patch_projection(patch_tokens), queries], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.output_projection(x[:, -len(self.queries):])


@register
class VisualQueryPromptMethod(Method):
    name = "visual_query_prompt"
    config_class = VisualQueryPromptConfig
    needs_vision = True

    def attach(self, model: nn.Module, language_model: nn.Module) -> dict[str, list[nn.Parameter]]:
        prompts = [e.method for e in state_of(model).methods() if isinstance(e.method, AdaptionPromptMethod)]
        if not prompts:
            raise IncompatibleMethodsError(
                "method 'visual_query_prompt' adds to the adaption prompts: apply an AdaptionPromptConfig before it"
            )
        query = VisualQuery(
            state_of(model).context, self.config, model.vision_tower.width, prompts[0].config.length,
            hidden_size(language_model), layer_device(model.connector), hidden_dtype(language_model),
        )
        query.train(model.training)  # eval blocks take PyTorch's fused path: follow the model's mode from the start
        model.add_module("visual_query", query)
        prompts[0].add_prompt_offset(query)
        return {"vision": list(query.parameters())}
