"""The language model's decoder layers compiled with `torch.compile` for the length of a training run.

On CPU the step's norms, activations and elementwise work are many small kernels, each with its framework time;
inductor fuses them per decoder layer (`benchmarks/bench_cpu_mfu.py --compile`: the main job's bf16 step 1.12x
faster on an AMD EPYC with AVX-512 BF16). Only each layer's `forward` is compiled, so the module tree, the
parameter names (checkpoints, adapter files) and the hooks the methods register stay as they are. The layers run
eagerly again when the run ends, by error or not, so evaluation and generation after training, whose shapes change
at every decoded token, never wait for a compile. `eagerly()` runs the compiled layers without compiling, for
evaluations in the middle of a run.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from peft_vlm.runtime.lm_layers import decoder_layers, language_model_of


@contextmanager
def compiled_decoder_layers(model: nn.Module, enabled: bool):
    """Within the block, each decoder layer of `model`'s language model runs a compiled `forward` (no-op for
    enabled=False); yields the number of layers compiled."""
    layers = decoder_layers(language_model_of(model)) if enabled else []
    for layer in layers:  # an instance attribute over the class's forward; deleting it restores the class's
        layer.forward = torch.compile(layer.forward)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            del layer.forward


def eagerly(compiled: bool):
    """A block in which compiled code runs without compiling (shapes that come once: an evaluation's)."""
    return torch.compiler.set_stance("force_eager") if compiled else nullcontext()
