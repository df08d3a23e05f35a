"""Options checked against a dataclass's field types: a wrong type or an unknown name is one `ConfigError` naming
the option, the value and what is accepted, before anything is built from them.

The rule is Python's, without its looseness: `True` is not an int, `2.5` is not an int, `"ten"` is not a number;
an int is a float; a list is a tuple (YAML has no tuples). A number must be finite (`.inf`, `.nan` are no learning
rate) and an integer below 2**32 in size (no count, size or seed is larger; 10**18 as a batch size would only fail deep
inside torch). A field may set a lower bound with `metadata=at_least(1)`. Types this module cannot judge (classes of a
library's own) are accepted as they are and left to the library to check.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import math
import types
import typing
from typing import Any

from peft_vlm.errors import ConfigError

_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_SEQUENCES = (list, tuple, set, frozenset, collections.abc.Sequence)
INTEGER_LIMIT = 2**32


def at_least(low: int | float) -> dict[str, Any]:
    """Field metadata: the option's smallest valid value (`field(default=None, metadata=at_least(1))`)."""
    return {"at_least": low}


def _beyond_range(value: Any) -> str:
    """Why a number that has the right type is still no value (empty when it is one)."""
    if isinstance(value, float) and not math.isfinite(value):
        return " (finite)"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= INTEGER_LIMIT:
        return " (below 2**32 in size)"
    return ""


def fits(value: Any, hint: Any) -> bool:
    """Whether `value` has the type `hint` (a type annotation) asks for."""
    if hint is Any or isinstance(hint, (str, typing.ForwardRef, typing.TypeVar)):
        return True
    if hint is None or hint is type(None):
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, arg) for arg in args)
    if origin is typing.Literal:
        return any(value == arg and type(value) is type(arg) for arg in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool) and not _beyond_range(value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and not _beyond_range(value)
    if hint is str:
        return isinstance(value, str)
    if origin in _SEQUENCES or hint in _SEQUENCES:
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(fits(v, a) for v, a in zip(value, args))
        return not args or all(fits(v, args[0]) for v in value)
    if origin in (dict, collections.abc.Mapping) or hint in (dict, collections.abc.Mapping):
        if not isinstance(value, dict):
            return False
        return len(args) != 2 or all(fits(k, args[0]) and fits(v, args[1]) for k, v in value.items())
    return True  # a library's own class: the library checks it


def describe(hint: Any) -> str:
    """A type annotation as a user reads it: `int`, `float or None`, `list of str`, `one of 'a', 'b'`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None) or hint is None:
        return "null"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(arg) for arg in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if origin in _SEQUENCES:
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} ({', '.join(describe(a) for a in args)})"
        return f"a list of {describe(args[0])}" if args else "a list"
    if origin in (dict, collections.abc.Mapping):
        return f"a mapping of {describe(args[0])} to {describe(args[1])}" if len(args) == 2 else "a mapping"
    return _NAMES.get(hint) or getattr(hint, "__name__", str(hint))


def field_types(config_class: type) -> dict[str, Any]:
    """{field name: type annotation} of a dataclass (annotations it cannot resolve are accepted as they are)."""
    try:
        hints = typing.get_type_hints(config_class)
    except Exception:  # a forward reference the class's module cannot resolve: names only
        hints = {}
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(config_class)}


def check_arguments(function: Any, values: Any, where: str, *given: Any) -> dict[str, Any]:
    """`values` as keyword arguments of `function` (its first positional arguments `given`): each a name it takes
    (any name where it takes **options) and of the type its annotation asks for, else a ConfigError naming it."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: options must be a mapping of option: value, got {values!r}")
    signature = inspect.signature(function)
    parameters = signature.parameters
    taken = signature.bind_partial(*given).arguments
    free = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # a forward reference its module cannot resolve: names only
        hints = {}
    for name, value in values.items():
        named = name in parameters and parameters[name].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                                 inspect.Parameter.KEYWORD_ONLY)
        if name in taken:
            raise ConfigError(f"{where}: {name!r} is not an option here; it is given by the model description itself")
        if not named and not free:
            known = [n for n, p in parameters.items() if n not in taken and p.kind is not p.VAR_KEYWORD]
            raise ConfigError(f"{where}: unknown option {name!r}; known: {', '.join(known)}")
        if named and not fits(value, hints.get(name, Any)):
            raise ConfigError(f"{where}: {name}={value!r} is not valid; "
                              f"{name} takes {describe(hints[name])}{_beyond_range(value)}")
    return values


def check_options(config_class: type, values: Any, where: str) -> dict[str, Any]:
    """`values` as keyword arguments for `config_class`, or a ConfigError naming the first option that does not fit."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: options must be a mapping of option: value, got {values!r}")
    known = field_types(config_class)
    unknown = sorted(set(values) - set(known), key=str)
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(map(str, unknown))}; "
                          f"known: {', '.join(sorted(known))}")
    for name, value in values.items():
        if not fits(value, known[name]):
            raise ConfigError(f"{where}: {name}={value!r} is not valid; "
                              f"{name} takes {describe(known[name])}{_beyond_range(value)}")
    for field in dataclasses.fields(config_class):
        low, value = field.metadata.get("at_least"), values.get(field.name)
        if low is not None and isinstance(value, (int, float)) and not isinstance(value, bool) and value < low:
            raise ConfigError(f"{where}: {field.name}={value!r} is not valid; {field.name} must be at least {low}")
    return values

