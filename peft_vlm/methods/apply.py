"""`apply`, `merge` and `unmerge`: attach method configs (or presets) to a model, fold mergeable ones in.

Each of them completes or leaves the model as it was: what can be checked (names, options, combinations) is checked
before the first change, and a method that fails while attaching is rolled back with everything attached before it.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

from torch import nn

from peft_vlm.errors import ConfigError, IncompatibleMethodsError, UnknownMethodError
from peft_vlm.methods import presets
from peft_vlm.methods.registry import Method, available_methods, get_method, method_for_config
from peft_vlm.runtime import token_context
from peft_vlm.runtime.four_bit import keep_4bit_layers_differentiable
from peft_vlm.runtime.lm_layers import is_vision_language_model, language_model_of
from peft_vlm.runtime.tracking import AppliedMethod, refresh_trainable, state_of


def _check_compatible(model: nn.Module, method: Method, applied: list[str]) -> None:
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


def _for_target(config: Any, target: str) -> Any:
    """`config` as the config of the method that takes it into `target` (e.g. a peft.LoraConfig -> vision_lora)."""
    methods = available_methods().values()
    targets = sorted({m.target for m in methods})
    if target not in targets:
        raise ConfigError(f"target={target!r} is not a part methods attach to; targets: {', '.join(targets)}")
    for method_class in methods:
        adopted = method_class.config_for_target(config) if method_class.target == target else None
        if adopted is not None:
            return adopted
    raise ConfigError(f"target={target!r}: no method takes a {type(config).__name__} into the {target} part; "
                      f"there: {', '.join(sorted(m.name for m in methods if m.target == target))}")


def _attributes(obj: Any) -> dict[str, tuple[Any, Any]]:
    """obj's attributes, each with a copy of its contents when it is a dict or list (hooks, submodules, parameters
    live in dicts), so that `_restore` can put them back in place: objects that share them keep sharing them."""
    return {key: (value, dict(value) if isinstance(value, dict) else list(value) if isinstance(value, list) else None)
            for key, value in vars(obj).items()}


def _restore(obj: Any, saved: dict[str, tuple[Any, Any]]) -> None:
    attributes = vars(obj)
    attributes.clear()
    for key, (value, contents) in saved.items():
        if isinstance(value, dict):
            value.clear()
            value.update(contents)
        elif isinstance(value, list):
            value[:] = contents
        attributes[key] = value


@contextlib.contextmanager
def rollback_on_error(model: nn.Module) -> Iterator[None]:
    """Run a block that changes `model`; if it raises, put back every module's attributes (submodules, parameters,
    buffers, hooks), the configs, the adapter state and which parameters train, exactly as they were.

    Tensors changed in place are not restored: blocks that write into existing tensors do it last, after every
    check has passed."""
    state = state_of(model, create=False)
    objects = list(model.modules())
    configs = {id(c): c for c in (getattr(m, "config", None) for m in objects) if hasattr(c, "__dict__")}
    objects += [c for c in configs.values() if not isinstance(c, nn.Module)]  # e.g. the attention implementation
    if state is not None:
        objects += [state, *[entry.method for entry in state.applied if entry.method is not None]]
        objects += [state.context] if state.context is not None else []
    saved = [(obj, _attributes(obj)) for obj in objects]
    trainable = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    except BaseException:
        for obj, attributes in saved:
            _restore(obj, attributes)
        for parameter, requires_grad in trainable:
            parameter.requires_grad_(requires_grad)
        raise


def apply(model: nn.Module, *configs: Any, target: str = "language") -> nn.Module:
    """Attach methods to a VisionLanguageModel or a bare transformers causal LM; return the model.

    Each argument is a method config (e.g. `AdaptionPromptConfig(...)`, `peft.LoraConfig(...)`), a preset name
    from `adapters/`, or a method name (default options). Base weights stay frozen; the methods' parameters train.
    All of them are attached, or none: the model is left as it was if any is refused. `target="vision"` puts
    `peft.LoraConfig`s into the vision tower instead of the language model (method `vision_lora`, group `vision`).
    """
    resolved = [config for spec in configs for config in _resolve(spec)]
    if target != "language":
        resolved = [_for_target(config, target) for config in resolved]
    language_model = language_model_of(model)
    methods = [method_for_config(config)(config) for config in resolved]
    state = state_of(model, create=False)
    applied = state.names() if state is not None else []
    for method in methods:  # every name, option and combination is checked before the model is touched
        _check_compatible(model, method, applied)
        applied.append(method.name)
    with rollback_on_error(model):
        token_context.install(model, language_model)
        for method in methods:
            parameters = method.attach(model, language_model)
            state_of(model).add(AppliedMethod(method.name, method.config, method, parameters))
        refresh_trainable(model)
    keep_4bit_layers_differentiable(language_model)
    return model


def is_merged(model: nn.Module) -> list[str]:
    """Names of the methods folded into the base weights now (by `merge`); empty when none is."""
    state = state_of(model, create=False)
    entries = state.methods() if state is not None else []
    return [entry.name for entry in entries if entry.method.mergeable and getattr(entry.method, "merged", False)]


def _fold(model: nn.Module, entries: list[AppliedMethod], step: str, undo: str) -> None:
    done = []
    try:
        for entry in entries:
            getattr(entry.method, step)(model)
            done.append(entry)
    except BaseException:
        for entry in reversed(done):  # a method that failed half-way leaves its own layers as they were
            getattr(entry.method, undo)(model)
        raise


def merge(model: nn.Module) -> nn.Module:
    """Fold every mergeable method into the base weights (undo with `unmerge`); others keep running as they are.

    Every method is asked first whether it can merge; if one refuses, none is merged."""
    entries = [e for e in state_of(model).methods() if e.method.mergeable and not getattr(e.method, "merged", False)]
    for entry in entries:
        entry.method.check_merge(model)
    with rollback_on_error(model):
        _fold(model, entries, "merge", "unmerge")
    return model


def unmerge(model: nn.Module) -> nn.Module:
    entries = [entry for entry in reversed(state_of(model).methods()) if entry.method.mergeable]
    with rollback_on_error(model):
        _fold(model, entries, "unmerge", "merge")
    return model
