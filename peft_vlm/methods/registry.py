"""Method plugins: the base class and the registry (built-ins and the `peft_vlm.methods` entry points).

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

from peft_vlm.errors import ConfigError, NotMergeableError, UnknownMethodError
from peft_vlm.options import check_options

ENTRY_POINT_GROUP = "peft_vlm.methods"

BUILTIN_METHODS = {
    "lora": "peft_vlm.methods.lora:LoraMethod",
    "vision_lora": "peft_vlm.methods.vision_lora:VisionLoraMethod",
    "adaption_prompt": "peft_vlm.methods.adaption_prompt:AdaptionPromptMethod",
    "bias_scale": "peft_vlm.methods.bias_scale:BiasScaleMethod",
    "early_fusion": "peft_vlm.methods.early_fusion:EarlyFusionMethod",
    "visual_query_prompt": "peft_vlm.methods.visual_query_prompt:VisualQueryPromptMethod",
    "visual_expert": "peft_vlm.methods.visual_expert:VisualExpertMethod",
    "gated_cross_attention": "peft_vlm.methods.gated_cross_attention:GatedCrossAttentionMethod",
}


class Method:
    """Attach one method to a model. Subclasses set `name` and `config_class` and implement `attach`.

    A mergeable method implements `merge` and `unmerge`, sets `merged` (whether its weights are folded in now), and
    may implement `check_merge` to refuse before any method of the model is merged.
    """

    name: ClassVar[str]
    config_class: ClassVar[type]
    #: Methods that cannot share a model with this one (by registry name).
    incompatible_with: ClassVar[tuple[str, ...]] = ()
    #: Whether the method may be applied more than once to the same model.
    repeatable: ClassVar[bool] = False
    #: Whether the method needs a VisionLanguageModel (image tokens, visual features) rather than a bare LM.
    needs_vision: ClassVar[bool] = False
    #: False when the method feeds the images to the language model itself, so that the VisionLanguageModel leaves
    #: their visual tokens out of the token sequence (read through `VisionLanguageModel.images_in_sequence`).
    images_in_sequence: ClassVar[bool] = True
    #: The part of the model the method attaches to: "language", or another one that `pv.apply(model, config,
    #: target=...)` names (e.g. "vision": LoRA in the vision tower).
    target: ClassVar[str] = "language"

    def __init__(self, config: Any) -> None:
        self.config = config

    def attach(self, model: nn.Module, language_model: nn.Module) -> dict[str, list[nn.Parameter]]:
        """Modify the model in place; return {parameter group: parameters added or unfrozen}."""
        raise NotImplementedError

    def merge(self, model: nn.Module) -> None:
        raise NotMergeableError(f"method '{self.name}' cannot be merged into the base weights")

    def unmerge(self, model: nn.Module) -> None:
        raise NotMergeableError(f"method '{self.name}' cannot be merged into the base weights")

    def check_merge(self, model: nn.Module) -> None:
        """Raise NotMergeableError if `merge` would refuse; called for every method before any is merged."""

    def packing_refusal(self) -> str | None:
        """Why the method cannot train on packed rows (several samples in one row, `train.packing`), or None.

        A method acting per position (LoRA, bias/scale, text prompts, experts routed by token type) sees packed
        samples as it sees them alone. One that reads the images (`needs_vision`) pairs them with batch rows, which
        packing breaks, so it refuses unless it says otherwise."""
        if self.needs_vision:
            return "it reads each batch row's images, and a packed row holds several samples"
        return None

    @classmethod
    def config_for_target(cls, config: Any) -> Any:
        """`config` as this method's own when `pv.apply(..., target=cls.target)` is given it, else None."""
        return config if isinstance(config, cls.config_class) else None

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


def config_from_entry(entry: Any, where: str) -> Any:
    """The method config of a preset, recipe or adapter-file entry: `{method: NAME, option: value, ...}`.

    The method name, each option's name and type, and the config's own checks are verified here, the one place
    every entry passes through; each error is a ConfigError that starts with `where` and names the option.
    """
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping {{method: NAME, option: value, ...}}, got {entry!r}")
    options = dict(entry)
    name = options.pop("method", None)
    if not isinstance(name, str):
        raise ConfigError(
            f"{where}: 'method' must name a method, got {name!r}; methods: {', '.join(sorted(available_methods()))}"
        )
    method_class = get_method(name)
    where = f"{where} ({name})"
    if dataclasses.is_dataclass(method_class.config_class):
        check_options(method_class.config_class, options, where)
    try:
        return method_class.config_from_dict(options)
    except (TypeError, ValueError, UnknownMethodError) as error:  # the config class's own checks
        raise ConfigError(f"{where}: {error}") from None


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
    """The method whose config class `config` is, else the first whose config class it derives from."""
    methods = available_methods().values()
    for method_class in [m for m in methods if type(config) is m.config_class] + list(methods):
        if isinstance(config, method_class.config_class):
            return method_class
    raise UnknownMethodError(
        f"no method accepts a config of type {type(config).__name__}; "
        f"known config types: {', '.join(sorted(m.config_class.__name__ for m in available_methods().values()))}"
    )
