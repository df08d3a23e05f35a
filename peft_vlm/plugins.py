"""Method plugins: the base class, the registry (built-ins and the `peft_vlm.methods` entry points) and `apply`.

A method is a config class plus a `Method` subclass that attaches it to a model and reports, per parameter group,
the parameters it added or unfroze. This module never imports a method: built-ins are named by import path and
loaded on first use, exactly like third-party methods found through entry points.
"""
from __future__ import annotations

import dataclasses
import importlib
from importlib.metadata import entry_points
from typing import Any, ClassVar

from torch import nn

from peft_vlm import routing
from peft_vlm.errors import IncompatibleMethodsError, NotMergeableError, UnknownMethodError
from peft_vlm.state import AppliedMethod, refresh_trainable, state_of

ENTRY_POINT_GROUP = "peft_vlm.methods"

BUILTIN_METHODS = {
    "lora": "peft_vlm.methods.lora:LoraMethod",
    "adaption_prompt": "peft_vlm.methods.adaption_prompt:AdaptionPromptMethod",
    "bias_scale": "peft_vlm.methods.bias_scale:BiasScaleMethod",
    "early_fusion": "peft_vlm.methods.early_fusion:EarlyFusionMethod",
    "visual_query_prompt": "peft_vlm.methods.early_fusion:VisualQueryPromptMethod",
    "visual_expert": "peft_vlm.methods.visual_expert:VisualExpertMethod",
    "gated_cross_attention": "peft_vlm.methods.gated_cross_attention:GatedCrossAttentionMethod",
}


class Method:
    """Attach one method to a model. Subclasses set `name` and `config_class` and implement `attach`."""

    name: ClassVar[str]
    config_class: ClassVar[type]
    #: Methods that cannot share a model with this one (by registry name).
    incompatible_with: ClassVar[tuple[str, ...]] = ()
    #: Whether the method may be applied more than once to the same model.
    repeatable: ClassVar[bool] = False
    #: Whether the method needs a VisionLanguageModel (image tokens, visual features) rather than a bare LM.
    needs_vision: ClassVar[bool] = False

    def __init__(self, config: Any) -> None:
        self.config = config

    def attach(self, model: nn.Module, language_model: nn.Module) -> dict[str, list[nn.Parameter]]:
        """Modify the model in place; return {parameter group: parameters added or unfrozen}."""
        raise NotImplementedError

    def merge(self, model: nn.Module) -> None:
        raise NotMergeableError(f"method '{self.name}' cannot be merged into the base weights")

    def unmerge(self, model: nn.Module) -> None:
        raise NotMergeableError(f"method '{self.name}' cannot be merged into the base weights")

    @property
    def mergeable(self) -> bool:
        return type(self).merge is not Method.merge

    # Configs travel in adapter files as JSON; dataclass configs need nothing more.
    def config_to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    @classmethod
    def config_from_dict(cls, values: dict[str, Any]) -> Any:
        known = {f.name for f in dataclasses.fields(cls.config_class)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UnknownMethodError(
                f"method '{cls.name}' has no option(s) {', '.join(unknown)}; known options: {', '.join(sorted(known))}"
            )
        return cls.config_class(**values)


_registry: dict[str, type[Method]] = {}
_loaded = False


def register(method_class: type[Method]) -> type[Method]:
    """Register a method class (usable as a decorator)."""
    _registry[method_class.name] = method_class
    return method_class


def _load_reference(reference: str) -> type[Method]:
    module_name, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


def _scan_entry_points() -> None:
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.name not in _registry:
            _registry[entry_point.name] = entry_point.load()


def _ensure_loaded() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name, reference in BUILTIN_METHODS.items():
        _registry.setdefault(name, _load_reference(reference))
    _scan_entry_points()


def available_methods() -> dict[str, type[Method]]:
    """Every known method by name: built-ins, registered classes and installed `peft_vlm.methods` entry points."""
    _ensure_loaded()
    _scan_entry_points()  # packages installed since the last look
    return dict(_registry)


def get_method(name: str) -> type[Method]:
    methods = available_methods()
    if name not in methods:
        raise UnknownMethodError(f"unknown method '{name}'; available methods: {', '.join(sorted(methods))}")
    return methods[name]


def method_for_config(config: Any) -> type[Method]:
    for method_class in available_methods().values():
        if isinstance(config, method_class.config_class):
            return method_class
    raise UnknownMethodError(
        f"no method accepts a config of type {type(config).__name__}; "
        f"known config types: {', '.join(sorted(m.config_class.__name__ for m in available_methods().values()))}"
    )


def language_model_of(model: nn.Module) -> nn.Module:
    """The causal LM inside a VisionLanguageModel, or the model itself for a bare transformers LM."""
    return getattr(model, "language_model", model)


def is_vision_language_model(model: nn.Module) -> bool:
    return getattr(model, "language_model", None) is not None


def _check_compatible(model: nn.Module, method: Method) -> None:
    applied = state_of(model).names()
    if method.name in applied and not method.repeatable:
        raise IncompatibleMethodsError(f"method '{method.name}' is already applied to this model")
    for other in applied:
        other_class = _registry.get(other)
        blocked = method.name in getattr(other_class, "incompatible_with", ()) or other in method.incompatible_with
        if blocked:
            raise IncompatibleMethodsError(f"method '{method.name}' cannot be combined with '{other}' on one model")
    if method.needs_vision and not is_vision_language_model(model):
        raise IncompatibleMethodsError(
            f"method '{method.name}' needs a pv.VisionLanguageModel (it reads image tokens); got {type(model).__name__}"
        )


def _resolve(spec: Any) -> list[Any]:
    """A config object stays as it is; a string names a preset from adapters/ or a method with default options."""
    if not isinstance(spec, str):
        return [spec]
    from peft_vlm import presets  # presets build configs through this module's registry

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
    routing.install(model, language_model)
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
