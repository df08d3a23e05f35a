"""Packed rows on the model side: several samples in one row of a batch, each seeing only itself.

A packed batch (`Collator(packing=True)`) carries `sequence_ids` (rows, length): the example each position belongs
to, -1 on padding. From them the model derives what the language model needs, in its attention implementation's
own form (no attention code of `transformers` is copied):

- position ids that restart at 0 with every sample, so a packed sample is embedded as it would be alone;
- for SDPA and eager attention, a block-diagonal causal 4D mask (bool for SDPA, additive float for eager): a query
  attends to the earlier positions of its own sample only. Padding is a block of its own, so that no query row is
  fully masked (a fully masked softmax is NaN, and NaN reaches the gradients even where no label is);
- for flash attention (`flash_attention_2` / `_3`, where installed), the varlen arguments `cu_seq_lens_q/k` and
  `max_length_q/k`, which `transformers` hands to `flash_attn_varlen_func` over the flattened rows.

Methods acting per position need nothing more. Methods that read the images find the sample of each position and
of each image in the call's `VisualInputs` (`sequence_ids`, `image_sequences`): early fusion and gated
cross-attention attend to their own sample's images only. A method that pairs images with whole batch rows refuses
packing by name (`Method.packing_refusal`), checked here before a packed batch runs.
"""
from __future__ import annotations

import dataclasses

import torch

from peft_vlm.errors import ConfigError
from peft_vlm.runtime.attention import kernel_under
from peft_vlm.runtime.tracking import state_of

MASKED_KERNELS = ("sdpa", "eager")
VARLEN_KERNELS = ("flash_attention_2", "flash_attention_3")


def check_packing(model) -> None:
    """Raise a ConfigError naming the first applied method that cannot train on packed rows."""
    for entry in state_of(model).methods():
        refusal = getattr(entry.method, "packing_refusal", None)
        reason = refusal() if callable(refusal) else None
        if reason:
            raise ConfigError(f"train.packing: method '{entry.name}' cannot train on packed rows: {reason}; "
                              "set packing: false")


def kernel_of(config) -> str:
    """The attention kernel under the methods' extensible twin ("sdpa", "eager", "flash_attention_2", ...)."""
    return kernel_under(getattr(config, "_attn_implementation", None)) or "eager"


def check_kernel(config) -> str:
    kernel = kernel_of(config)
    if kernel not in MASKED_KERNELS + VARLEN_KERNELS:
        raise ConfigError(f"train.packing: attention implementation '{kernel}' cannot keep packed samples apart; "
                          f"use one of {', '.join(MASKED_KERNELS + VARLEN_KERNELS)}")
    return kernel


def segment_starts(sequence_ids: torch.Tensor) -> torch.Tensor:
    """(rows, length) True where a new segment (a sample, or a row's padding) begins."""
    starts = torch.ones_like(sequence_ids, dtype=torch.bool)
    starts[:, 1:] = sequence_ids[:, 1:] != sequence_ids[:, :-1]
    return starts


def packed_positions(sequence_ids: torch.Tensor) -> torch.Tensor:
    """(rows, length) position ids counting from 0 at the start of each segment."""
    index = torch.arange(sequence_ids.shape[1], device=sequence_ids.device).expand_as(sequence_ids)
    start = torch.where(segment_starts(sequence_ids), index, 0).cummax(-1).values
    return index - start


def block_causal_mask(sequence_ids: torch.Tensor) -> torch.Tensor:
    """(rows, 1, length, length) bool, True where query i may attend to key j: j <= i in the same segment."""
    length = sequence_ids.shape[1]
    same = sequence_ids[:, :, None] == sequence_ids[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=sequence_ids.device).tril()
    return (same & causal)[:, None]


def varlen_arguments(sequence_ids: torch.Tensor) -> dict:
    """Flash attention's varlen keywords for the rows flattened into one sequence of segments."""
    starts = segment_starts(sequence_ids).reshape(-1).nonzero().view(-1)
    bounds = torch.cat([starts, starts.new_tensor([sequence_ids.numel()])])
    lengths = bounds[1:] - bounds[:-1]
    cumulative = bounds.to(torch.int32)
    longest = int(lengths.max())
    return {"cu_seq_lens_q": cumulative, "cu_seq_lens_k": cumulative, "max_length_q": longest,
            "max_length_k": longest}


def with_sequences(visual, sequence_ids: torch.Tensor, image_sequences: torch.Tensor | None,
                   image_positions: torch.Tensor):
    """The call's `VisualInputs` with the sample of each position and of each image (for images spliced into the
    sequence, the sample holding the image's first token; images outside it need `image_sequences`)."""
    if visual.has_images and image_sequences is None:
        if not bool(image_positions.any()):
            raise ConfigError("a packed batch with images outside the sequence needs image_sequences: the example "
                              "of each image (Collator(packing=True) gives it)")
        image_sequences = sequence_ids[image_positions][:: visual.tokens_per_image]
    if image_sequences is not None:
        image_sequences = image_sequences.to(sequence_ids.device)
    return dataclasses.replace(visual, sequence_ids=sequence_ids, image_sequences=image_sequences)


def packed_inputs(model, sequence_ids: torch.Tensor, dtype: torch.dtype) -> dict:
    """What the language model of `model` takes for a packed batch instead of a 2D attention mask: position ids and
    either a 4D mask (SDPA, eager) or flash attention's varlen keywords. Refuses methods and kernels that cannot
    keep the samples apart."""
    check_packing(model)
    kernel = check_kernel(model.config)
    inputs = {"position_ids": packed_positions(sequence_ids)}
    if kernel in VARLEN_KERNELS:
        return {**inputs, "attention_mask": None, **varlen_arguments(sequence_ids)}
    allowed = block_causal_mask(sequence_ids)
    if kernel == "eager":  # eager attention adds its mask to the scores
        allowed = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    return {**inputs, "attention_mask": allowed}
