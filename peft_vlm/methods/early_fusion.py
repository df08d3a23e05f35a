"""LLaMA-Adapter V2 visual fusion as the paper describes it: early fusion.

`EarlyFusionConfig` (paper, arXiv 2304.15010 sec 4.3): the connector's visual tokens enter only the first `layers`
layers, where every query attends to its row's visual tokens through the layer's frozen key/value projections, in
its own softmax, scaled per head by a zero-initialised gate tanh(g). The late layers keep their adaption prompts
for language only, so visual and language knowledge do not compete in the same layers.

The official V2 release's variant, a visual query added to the late prompts, is `visual_query_prompt.py`.

Which one to use: the paper's early fusion keeps the late prompts text-only (joint training with disjoint groups,
sec 4.2, relies on that); the official variant is what the released checkpoints were trained with.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peft_vlm.runtime.attention import AttentionCall, add_extension, attention_modules, gated_token_attention
from peft_vlm.errors import ConfigError, IncompatibleMethodsError
from peft_vlm.methods.registry import Method, register
from peft_vlm.runtime.lm_layers import hidden_dtype, layer_device
from peft_vlm.runtime.tracking import state_of


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
        visual = self.context.visual
        if visual.visual_tokens is None:
            return None
        rows = call.query.shape[0]
        tokens, mask, has_image = visual_tokens_by_row(visual.visual_tokens, visual.image_owner, rows)
        packed = visual.sequence_ids
        if packed is not None and packed.shape == (rows, call.query.shape[2]):
            mask, has_image = own_sample_tokens(packed, visual.image_sequences, visual.image_owner, rows,
                                                visual.visual_tokens.shape[1])
        # Rows (or packed samples) without an image attend to placeholder tokens, then get exactly zero.
        addition = gated_token_attention(call, tokens, self.gate, mask)
        return addition * has_image.to(addition.dtype).view(rows, -1, 1, 1)


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


def own_sample_tokens(sequence_ids: torch.Tensor, image_sequences: torch.Tensor, owner: torch.Tensor, rows: int,
                      count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows: (rows, length, keys) which of the row's visual tokens (as `visual_tokens_by_row` lays them out)
    each position may attend, those of its own sample's images only, and (rows, length) which positions have one
    (the others get an all-True mask and a zero result)."""
    per_row = torch.bincount(owner, minlength=rows)
    order = torch.arange(len(owner), device=owner.device) - (torch.cumsum(per_row, 0) - per_row)[owner]
    slot_sample = torch.full((rows, int(per_row.max())), -2, dtype=sequence_ids.dtype, device=owner.device)
    slot_sample[owner, order] = image_sequences.to(sequence_ids.dtype)
    key_sample = slot_sample.repeat_interleave(count, dim=1).to(sequence_ids.device)
    mask = sequence_ids[:, :, None] == key_sample[:, None, :]
    has_image = mask.any(-1)
    return mask | ~has_image[..., None], has_image


@register
class EarlyFusionMethod(Method):
    name = "early_fusion"
    config_class = EarlyFusionConfig
    needs_vision = True

    @property
    def images_in_sequence(self) -> bool:  # the paper's layout takes the visual tokens out of the sequence
        return self.config.visual_tokens_in_sequence

    def packing_refusal(self) -> str | None:
        return None  # packed, each position attends to its own sample's images (`own_sample_tokens`)

    def attach(self, model: nn.Module, language_model: nn.Module) -> dict[str, list[nn.Parameter]]:
        takes_images_out = not self.images_in_sequence
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
        return {"vision": parameters}
