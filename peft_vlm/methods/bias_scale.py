"""LLaMA-Adapter V2 bias/scale tuning (arXiv 2304.15010 sec 4.1), with the RMSNorm weights unfrozen.

Every targeted linear layer computes y = s * (W x + b), with a learnable bias b (0 at start) and scale s (1 at start)
per output feature. They are attached to the frozen layer as a small `bias_scale` submodule run by a forward hook,
so the layer keeps its type and its place: quantized (4-bit) layers and layers that peft wraps later work alike.

Merging folds them into the base weights, W' = s W and b' = s (b0 + b), and removes the hook and the submodule, so
the merged model is a plain model. Unmerging divides back (exact up to float rounding). A 4-bit base stays unmerged.
Save the adapter before merging (or after unmerging): once merged, b and s live in the base weights.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from peft_vlm.errors import ConfigError, NotMergeableError
from peft_vlm.methods.registry import Method, register
from peft_vlm.runtime.lm_layers import language_model_of

SUBMODULE = "bias_scale"
QUANTIZED_WEIGHTS = ("Params4bit", "Int8Params")


@dataclass
class BiasScaleConfig:
    """`targets`: "all-linear" (every linear layer of the decoder blocks, not the output head) or a list of layer
    names such as ["q_proj", "v_proj"]; `norms`: make the RMSNorm weights trainable too."""

    targets: str | list[str] = "all-linear"
    norms: bool = True
    exclude: list[str] = field(default_factory=list)

    def __post_init__(self):
        if isinstance(self.targets, str) and self.targets != "all-linear":
            raise ConfigError(
                f"BiasScaleConfig targets must be 'all-linear' or a list of layer names, got {self.targets!r}"
            )


class BiasScale(nn.Module):
    def __init__(self, features: int, device, dtype) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(features, device=device, dtype=dtype))
        self.scale = nn.Parameter(torch.ones(features, device=device, dtype=dtype))

    def forward(self, output: torch.Tensor) -> torch.Tensor:
        return (output + self.bias) * self.scale  # V2 eq. 6: y = s * (W x + b)


def _run_bias_scale(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    # A module-level hook (no closure), so copies of the model call their own submodule.
    return module.bias_scale(output)


def _layer_name(qualified: str) -> str:
    """The name a user targets: "q_proj" for "...self_attn.q_proj" and for peft's "...q_proj.base_layer"."""
    parts = qualified.split(".")
    return parts[-2] if parts[-1] == "base_layer" and len(parts) > 1 else parts[-1]


def target_linears(language_model: nn.Module, config: BiasScaleConfig) -> list[nn.Linear]:
    head = language_model.get_output_embeddings()
    found = []
    for name, module in language_model.named_modules():
        if not isinstance(module, nn.Linear) or module is head:
            continue
        if any(part.startswith("lora_") for part in name.split(".")):
            continue  # peft's own adapter weights
        layer = _layer_name(name)
        if layer in config.exclude or (config.targets != "all-linear" and layer not in config.targets):
            continue
        found.append(module)
    if not found:
        raise ConfigError(f"BiasScaleConfig: no linear layer of the language model matches targets={config.targets!r}")
    return found


def rms_norm_weights(language_model: nn.Module) -> list[nn.Parameter]:
    return [m.weight for m in language_model.modules() if type(m).__name__.endswith("RMSNorm") and m.weight is not None]


@register
class BiasScaleMethod(Method):
    name = "bias_scale"
    config_class = BiasScaleConfig

    def __init__(self, config: BiasScaleConfig) -> None:
        super().__init__(config)
        self.layers: list[tuple[nn.Linear, BiasScale]] = []
        self.hooks: dict[int, torch.utils.hooks.RemovableHandle] = {}
        self.had_bias: dict[int, bool] = {}
        self.merged = False

    def attach(self, model: nn.Module, language_model: nn.Module) -> dict[str, list[nn.Parameter]]:
        dtype = language_model.get_input_embeddings().weight.dtype  # 4-bit layers store another dtype
        for linear in target_linears(language_model, self.config):
            bias_scale = BiasScale(linear.out_features, linear.weight.device, dtype)
            self.layers.append((linear, bias_scale))
            self._wrap(linear, bias_scale)
        parameters = [p for _, bias_scale in self.layers for p in bias_scale.parameters()]
        if self.config.norms:
            parameters += rms_norm_weights(language_model)
        return {"language": parameters}

    def _wrap(self, linear: nn.Linear, bias_scale: BiasScale) -> None:
        linear.add_module(SUBMODULE, bias_scale)
        self.hooks[id(linear)] = linear.register_forward_hook(_run_bias_scale)

    def _unwrap(self, linear: nn.Linear) -> None:
        self.hooks.pop(id(linear)).remove()
        del linear._modules[SUBMODULE]

    def check_merge(self, model: nn.Module) -> None:
        if any(bool((bias_scale.scale == 0).any()) for _, bias_scale in self.layers):
            raise NotMergeableError("bias/scale has a zero scale: merging it could not be undone")

    @torch.no_grad()
    def merge(self, model: nn.Module) -> None:
        if self.merged:
            return
        if any(type(linear.weight).__name__ in QUANTIZED_WEIGHTS for linear, _ in self.layers):
            warnings.warn("bias/scale stays unmerged: folding it into quantized weights would re-quantize them (lossy)",
                          stacklevel=3)
            return
        self.check_merge(model)
        for linear, bias_scale in self.layers:
            scale, bias = bias_scale.scale.to(linear.weight.dtype), bias_scale.bias.to(linear.weight.dtype)
            self.had_bias[id(linear)] = linear.bias is not None
            base_bias = linear.bias if linear.bias is not None else torch.zeros_like(bias)
            merged_bias = scale * (base_bias + bias)  # b' = s (b0 + b)
            linear.weight.mul_(scale[:, None])  # W' = s W
            if linear.bias is None:
                linear.bias = nn.Parameter(merged_bias, requires_grad=False)
            else:
                linear.bias.copy_(merged_bias)
            self._unwrap(linear)
        self.merged = True

    @torch.no_grad()
    def unmerge(self, model: nn.Module) -> None:
        if not self.merged:
            return
        for linear, bias_scale in self.layers:
            scale, bias = bias_scale.scale.to(linear.weight.dtype), bias_scale.bias.to(linear.weight.dtype)
            linear.weight.div_(scale[:, None])
            if self.had_bias.pop(id(linear)):
                linear.bias.copy_(linear.bias / scale - bias)
            else:
                linear.bias = None
            self._wrap(linear, bias_scale)
        self.merged = False


def is_merged(model: nn.Module) -> bool:
    """Whether no bias/scale submodule runs in the language model any more."""
    return not any(isinstance(m, BiasScale) for m in language_model_of(model).modules())
