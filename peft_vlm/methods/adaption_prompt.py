"""LLaMA-Adapter (Zhang et al., arXiv 2303.16199): zero-init gated adaption prompts on the top layers.

Each of the top `layers` attention layers gets `length` learnable prompt vectors. They pass through the layer's own
frozen key/value projections (no rotary position: a prompt has no place in the sequence), every token's query
attends to them in a softmax of its own, and the result, scaled per head by tanh(g) with g = 0 at start, is added
to the layer's normal attention output. The model is therefore unchanged at initialisation, and the KV cache is
untouched: the K prompt keys are recomputed from the parameters at every call, which costs next to nothing.

It plugs in through `peft_vlm.runtime.attention` (an `AttentionInterface` twin of the model's own attention), so no
attention code of `transformers` is copied. With `multimodal=True` (sec 3.4) a global image feature, projected by a
trainable linear layer, is added to every prompt of the rows that have an image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from peft_vlm.runtime.attention import AttentionCall, add_extension, attention_modules, gated_token_attention
from peft_vlm.errors import ConfigError
from peft_vlm.runtime.lm_layers import hidden_dtype, hidden_size, layer_device
from peft_vlm.methods.registry import Method, register
from peft_vlm.runtime.tracking import state_of

#: (batch rows) -> prompt offsets (rows, 1 or length, hidden) to add to the prompts, or None for none this call.
PromptOffset = Callable[[int], "torch.Tensor | None"]


@dataclass
class AdaptionPromptConfig:
    """`length` prompt vectors on each of the top `layers` layers (all layers if the model has fewer)."""

    length: int = 10
    layers: int = 30
    multimodal: bool = False  # add a projected global image feature to every prompt (v1 sec 3.4)

    def __post_init__(self):
        if self.length < 1 or self.layers < 1:
            raise ConfigError(
                f"AdaptionPromptConfig needs length >= 1 and layers >= 1, got {self.length} and {self.layers}"
            )


def rows_mean(per_image: torch.Tensor, owner: torch.Tensor, rows: int) -> torch.Tensor:
    """Average of each batch row's image features (images, ...) -> (rows, ...); zeros for rows without an image."""
    sums = per_image.new_zeros(rows, *per_image.shape[1:]).index_add(0, owner, per_image)
    counts = torch.bincount(owner, minlength=rows).clamp(min=1).to(per_image.dtype)
    return sums / counts.view(rows, *[1] * (per_image.dim() - 1))


class VisualPromptOffset(nn.Module):
    """Base of the image-dependent prompt offsets: maps the images' patch tokens to a per-row offset, computed once
    per language-model call (not once per layer) and cleared when the next call starts."""

    def __init__(self, context) -> None:
        super().__init__()
        self.context = context  # the model's routing context: `context.visual` holds the running call's images
        self.cached: torch.Tensor | None = None
        context.call_transforms.append(self._clear)

    def _clear(self, context, kwargs) -> None:
        self.cached = None

    def per_image(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """(images, patches, vision width) -> (images, 1 or length, hidden)."""
        raise NotImplementedError

    def forward(self, rows: int) -> torch.Tensor | None:
        visual = self.context.visual
        if visual.patch_tokens is None:
            return None  # a text-only call: no visual contribution
        if self.cached is None:
            owner = visual.image_owner
            if int(owner.max()) >= rows:
                raise ConfigError(f"the images belong to {int(owner.max()) + 1} batch rows but the call has {rows}")
            weight = next(self.parameters())
            self.cached = rows_mean(self.per_image(visual.patch_tokens.to(weight.device, weight.dtype)), owner, rows)
        return self.cached


class GlobalImageFeature(VisualPromptOffset):
    """v1 sec 3.4: the image's global feature (mean of its patch tokens), projected to the LM's width."""

    def __init__(self, context, vision_width: int, hidden: int, device, dtype) -> None:
        super().__init__(context)
        self.projection = nn.Linear(vision_width, hidden, device=device, dtype=dtype)

    def per_image(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        return self.projection(patch_tokens.mean(1)).unsqueeze(1)


class AdaptionPrompt(nn.Module):
    """One layer's prompts and per-head gates; runs as an attention extension of that layer."""

    def __init__(self, length: int, hidden: int, heads: int, offsets: list[PromptOffset], device, dtype) -> None:
        super().__init__()
        # N(0, 1) like the paper's prompt embedding, so the prompts match the scale of normalised hidden states.
        self.prompt = nn.Parameter(torch.randn(length, hidden, device=device, dtype=dtype))
        self.gate = nn.Parameter(torch.zeros(heads, device=device, dtype=dtype))  # g = 0: tanh(g) = 0 at start
        self.offsets = offsets  # shared with the method: visual offsets added to every layer's prompts

    def forward(self, call: AttentionCall) -> torch.Tensor:
        prompts = self.prompt.unsqueeze(0)
        for offset in self.offsets:
            addition = offset(call.query.shape[0])
            if addition is not None:
                prompts = prompts + addition.to(prompts.dtype)
        # LLaMA-Adapter eq. 8-10: S_g = [softmax(S_K) * tanh(g); softmax(S_M)], i.e. a separately gated softmax
        return gated_token_attention(call, prompts, self.gate)


@register
class AdaptionPromptMethod(Method):
    name = "adaption_prompt"
    config_class = AdaptionPromptConfig

    def __init__(self, config: AdaptionPromptConfig) -> None:
        super().__init__(config)
        self.offsets: list[PromptOffset] = []

    @property
    def needs_vision(self) -> bool:  # per instance: only the multimodal variant reads images
        return self.config.multimodal

    def packing_refusal(self) -> str | None:
        if self.config.multimodal or self.offsets:
            return ("its image offsets (multimodal=True, a visual query prompt) are added to the prompts of a whole "
                    "batch row, and a packed row holds several samples")
        return None  # text prompts are the same for every position

    def add_prompt_offset(self, offset: PromptOffset) -> None:
        """Add `offset(rows)` to the prompts of every adapted layer (used by visual variants)."""
        self.offsets.append(offset)

    def attach(self, model: nn.Module, language_model: nn.Module) -> dict[str, list[nn.Parameter]]:
        hidden, dtype = hidden_size(language_model), hidden_dtype(language_model)
        heads = language_model.config.num_attention_heads
        groups: dict[str, list[nn.Parameter]] = {"language": []}
        for module in attention_modules(language_model)[-self.config.layers:]:
            prompt = AdaptionPrompt(self.config.length, hidden, heads, self.offsets, layer_device(module), dtype)
            module.add_module("adaption_prompt", prompt)
            add_extension(language_model, module, prompt)
            groups["language"] += [prompt.prompt, prompt.gate]
        if self.config.multimodal:
            feature = GlobalImageFeature(
                state_of(model).context, model.vision_tower.width, hidden, layer_device(model.connector), dtype
            )
            model.add_module("adaption_prompt_image_feature", feature)
            self.add_prompt_offset(feature)
            groups["vision"] = list(feature.parameters())
        return groups
