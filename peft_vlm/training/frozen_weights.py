"""Frozen linear weights held in the autocast dtype for the length of a training run.

Under autocast every `nn.Linear` casts its weight to bf16 at each call, and torch caches that cast only for leaf
tensors that require grad, so a frozen weight is cast again in every forward (holding them in bf16 made the CPU
main job's bf16 step 1.07x faster; benchmarks/bench_cpu_mfu.py). Holding each frozen linear weight in bf16 while
training gives the matmuls exactly the operands autocast would have given them (the losses are equal bit for bit)
without the cast. Everything else stays as it was: trained tensors (the fp32 masters), embeddings and norms,
whose outputs keep the residual stream in fp32.
A weight shared with another module (a tied LM head) gets its own bf16 copy, so the embedding keeps its fp32 one.
The fp32 weights come back when the run ends, by error or not.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def frozen_linear_weights_in(model: nn.Module, dtype: torch.dtype | None):
    """Within the block, every frozen fp32 `nn.Linear.weight` of `model` is a `dtype` copy (no-op for None)."""
    originals: list[tuple[nn.Linear, nn.Parameter]] = []
    if dtype is not None:
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if (isinstance(module, nn.Linear) and isinstance(weight, nn.Parameter) and not weight.requires_grad
                    and weight.dtype == torch.float32):
                originals.append((module, weight))
                module.weight = nn.Parameter(weight.detach().to(dtype), requires_grad=False)
    try:
        yield len(originals)
    finally:
        for module, weight in originals:
            module.weight = weight
