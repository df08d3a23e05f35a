"""LoRA and QLoRA through peft: `pv.apply(model, peft.LoraConfig(...))`.

peft's LoRA layers are injected into the language model only (never into the vision tower or the connector, which
`target_modules` would otherwise also match by name); `peft_vlm.methods.vision_lora` puts them in the vision tower
when asked. On a 4-bit base this is QLoRA. The injected weights can also be
exported in peft's own format and loaded with `peft.PeftModel.from_pretrained` on the bare language model.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Any

import peft
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch import nn

from peft_vlm.errors import ConfigError, PeftVlmError
from peft_vlm.methods.registry import Method, register
from peft_vlm.options import fits
from peft_vlm.runtime.lm_layers import language_model_of
from peft_vlm.runtime.tracking import state_of

ADAPTER_NAME = "default"


def is_quantized(language_model: nn.Module) -> bool:
    return bool(
        getattr(language_model, "is_loaded_in_4bit", False) or getattr(language_model, "is_loaded_in_8bit", False)
    )


def check_ranges(config: peft.LoraConfig) -> None:
    """peft accepts any rank, scale and dropout; a rank of 0 or 10**11 would fail (or fill the memory) only when the
    matrices are made. One ConfigError naming the option, for a config from a recipe or built in Python; the type
    and size rules are the recipes' own (`options.fits`: finite numbers, integers below 2**32, no bools)."""
    ranks = {"r": config.r, **{f"rank_pattern[{k!r}]": v for k, v in (config.rank_pattern or {}).items()}}
    alphas = {"lora_alpha": config.lora_alpha,
              **{f"alpha_pattern[{k!r}]": v for k, v in (config.alpha_pattern or {}).items()}}
    for name, rank in ranks.items():
        if not fits(rank, int) or rank < 1:
            raise ConfigError(f"LoraConfig {name}={rank!r}: a LoRA rank is an integer from 1 to 2**32 - 1")
    for name, alpha in alphas.items():
        if not fits(alpha, float) or alpha <= 0:
            raise ConfigError(f"LoraConfig {name}={alpha!r}: the LoRA scale's numerator is a finite number > 0")
    dropout = config.lora_dropout
    if not fits(dropout, float) or not 0 <= dropout < 1:
        raise ConfigError(f"LoraConfig lora_dropout={dropout!r}: a dropout probability is a number from 0 below 1")


@register
class LoraMethod(Method):
    name = "lora"
    config_class = peft.LoraConfig
    #: the parameter group of the LoRA weights, and the part of the model (`root`) they go into
    group = "language"

    def root(self, model: nn.Module) -> nn.Module:
        return language_model_of(model)

    def attach(self, model: nn.Module, language_model: nn.Module) -> dict[str, list[nn.Parameter]]:
        root = self.root(model)
        before = {id(p): p.requires_grad for p in root.parameters()}
        try:
            peft.inject_adapter_in_model(self.config, root, adapter_name=ADAPTER_NAME)
        except ValueError as error:  # peft names the target modules it could not find
            part = "language model" if self.group == "language" else "vision tower"
            raise PeftVlmError(f"LoRA could not be applied to the {part}: {error}") from None
        added = [p for p in root.parameters() if p.requires_grad and not before.get(id(p), False)]
        return {self.group: added}

    def __init__(self, config: peft.LoraConfig) -> None:
        check_ranges(config)
        super().__init__(config)
        self.unplugged: list[tuple[nn.Module, str, LoraLayer]] = []  # merged layers out of the model, for unmerge

    @property
    def merged(self) -> bool:
        return bool(self.unplugged)

    def _lora_layers(self, model: nn.Module) -> list[LoraLayer]:
        return [m for m in self.root(model).modules() if isinstance(m, LoraLayer)]

    def merge(self, model: nn.Module) -> None:
        """Fold B A into the base weights and put each base layer back in place of its LoRA wrapper: a merged model
        runs the modules of the base model and nothing else (a wrapper left in place costs a Python call per layer
        and token, measured at several percent of `generate`'s speed). Save the adapter before merging."""
        root = self.root(model)
        if is_quantized(root):
            warnings.warn(
                "LoRA stays unmerged: merging into 4-bit weights would re-quantize them (lossy)", stacklevel=3
            )
            return
        for name, layer in list(root.named_modules()):
            if isinstance(layer, LoraLayer):
                layer.merge(adapter_names=[ADAPTER_NAME])
                parent_name, _, child = name.rpartition(".")
                parent = root.get_submodule(parent_name)
                setattr(parent, child, layer.base_layer)
                self.unplugged.append((parent, child, layer))

    def unmerge(self, model: nn.Module) -> None:
        while self.unplugged:
            parent, child, layer = self.unplugged.pop()
            setattr(parent, child, layer)
        for layer in self._lora_layers(model):
            if layer.merged:
                layer.unmerge()

    def config_to_dict(self) -> dict[str, Any]:
        """The options that differ from peft's defaults (the rest is peft's to fill in on loading)."""
        def plain(config):
            values = config.to_dict()
            return json.loads(json.dumps(values, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))

        defaults = plain(peft.LoraConfig())
        return {k: v for k, v in plain(self.config).items() if v != defaults.get(k) and k != "peft_version"}

    @classmethod
    def config_from_dict(cls, values: dict[str, Any]) -> peft.LoraConfig:
        values = {k: v for k, v in values.items() if k not in ("peft_type", "task_type", "revision")}
        try:
            return cls.config_class(**values)
        except TypeError as error:
            raise PeftVlmError(f"invalid LoRA options: {error}") from None


def export_peft(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write the LoRA weights as `adapter_config.json` + `adapter_model.safetensors`, loadable with plain peft.

    `peft.PeftModel.from_pretrained(bare_language_model, directory)` then gives the same logits as this model's
    language model.
    """
    entries = [e for e in state_of(model).methods() if e.name == LoraMethod.name]
    if not entries:
        raise PeftVlmError("export_peft: no LoRA method is applied to this model")
    language_model = language_model_of(model)
    weights = peft.get_peft_model_state_dict(language_model, adapter_name=ADAPTER_NAME)
    os.makedirs(directory, exist_ok=True)
    config = entries[0].config
    config.base_model_name_or_path = getattr(language_model, "name_or_path", None)
    config.save_pretrained(directory)
    # PeftModel stores weights under its own wrapper prefix.
    save_file(
        {f"base_model.model.{name}": tensor.detach().cpu().contiguous() for name, tensor in weights.items()},
        os.path.join(directory, "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
