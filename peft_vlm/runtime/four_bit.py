"""A bitsandbytes 4-bit base that trains: its layers keep the weight layout that has a backward."""
from __future__ import annotations

from torch import nn


def keep_4bit_layers_differentiable(model: nn.Module) -> None:
    """On a CPU with AVX-512 BF16, bitsandbytes repacks a 4-bit layer's weight for its inference kernel at the
    layer's first eval-mode forward and keeps it repacked; that kernel has no backward, so a training step after any
    evaluation (an accuracy curve, a describe pass, a check before `pv.apply`) would get no gradient through the
    base. A model that is going to train turns the repacking off and has repacked weights put back."""
    for module in model.modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        module.support_avx512bf16_for_cpu = False
        weight = module.weight
        if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse  # bitsandbytes' own inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
