"""`apply`, `merge` and `unmerge`: attach method configs (or presets) to a model, fold mergeable ones in."""
from __future__ import annotations

from typing import Any

from torch import nn

from peft_vlm.errors import IncompatibleMethodsError, UnknownMethodError
from peft_vlm.methods import presets
from peft_vlm.methods.registry import Method, available_methods, get_method, method_for_config
from peft_vlm.runtime import token_context
from peft_vlm.runtime.lm_layers import is_vision_language_model, language_model_of
from peft_vlm.runtime.tracking import AppliedMethod, refresh_trainable, state_of


def _check_compatible(model: nn.Module, method: Method) -> None:
    applied = state_of(model).names()
    if method.name in applied and not method.repeatable:
        raise IncompatibleMethodsError(f"method '{method.name}' is already applied to this model")
    for other in applied:
        other_class = available_methods().get(other)
        blocked = method.name in getattr(other_class, "incompatible_with", ()) or other in method.incompatible_with
        if blocked:
            raise IncompatibleMethodsError(f"method '{method.name}' cannot be combined with '{other}' on one model")
    reason = model.refusal(method) if hasattr(model, "refusal") else None  # e.g. a wrapped transformers VLM
    if reason:
        raise IncompatibleMethodsError(reason)
    if method.needs_vision and not is_vision_language_model(model):
        raise IncompatibleMethodsError(
            f"method '{method.name}' needs a pv.VisionLanguageModel (it reads image tokens); got {type(model).__name__}"
        )


def _resolve(spec: Any) -> list[Any]:
    """A config object stays as it is; a string names a preset from adapters/ or a method with default options."""
    if not isinstance(spec, str):
        return [spec]
    if spec in presets.available_presets():
        return presets.load_preset(spec)
    if spec in available_methods():
        return [get_method(spec).config_class()]
    raise UnknownMethodError(
        f"unknown method or preset '{spec}'; presets: {', '.join(presets.available_presets()) or 'none'}; "
        f"methods: {', '.join(sorted(available_methods()))}"
    )


def apply(model: nn.Module, *configs: Any) -> nn.Module:
    """Attach methods to a VisionLanguageModel or a bare transformers causal LM; return the model.

    Each argument is a method config (e.g. `AdaptionPromptConfig(...)`, `peft.LoraConfig(...)`), a preset name
    from `adapters/`, or a method name (default options). Base weights stay frozen; the methods' parameters train.
    """
    language_model = language_model_of(model)
    token_context.install(model, language_model)
    for config in (c for spec in configs for c in _resolve(spec)):
        method = method_for_config(config)(config)
        _check_compatible(model, method)
        parameters = method.attach(model, language_model)
        state_of(model).add(AppliedMethod(method.name, config, method, parameters))
    refresh_trainable(model)
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold every mergeable method into the base weights (undo with `unmerge`); others keep running as they are."""
    for entry in state_of(model).methods():
        if entry.method.mergeable:
            entry.method.merge(model)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    for entry in reversed(state_of(model).methods()):
        if entry.method.mergeable:
            entry.method.unmerge(model)
    return model
