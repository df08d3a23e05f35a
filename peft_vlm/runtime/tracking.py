"""Which methods a model carries and which parameters each one trains.

One record per model is the single source of truth for "trainable = saved = summarised": a parameter is trainable
exactly when a method (or the connector) registered it here, and `save_adapter` writes exactly those parameters.
Parameters are tracked by identity, so a later method that wraps a module (and renames its parameters) keeps the
record valid; names are looked up only when they are needed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

STATE_ATTRIBUTE = "_peft_vlm_state"


@dataclass
class AppliedMethod:
    """A method as applied to one model: its registry name, its config, the method object, its parameters by group."""

    name: str
    config: Any
    method: Any  # a `peft_vlm.methods.registry.Method`, or None for built-in parts such as the connector
    parameters: dict[str, list[nn.Parameter]] = field(default_factory=dict)

    def num_parameters(self, group: str | None = None) -> int:
        groups = [group] if group is not None else list(self.parameters)
        return sum(p.numel() for g in groups for p in self.parameters.get(g, ()))


class AdapterState:
    """The methods applied to a model, in order, and the context they read while the model runs."""

    def __init__(self) -> None:
        self.applied: list[AppliedMethod] = []
        self.context = None  # a `peft_vlm.runtime.token_context.RoutingContext`, installed by `token_context.install`
        # Names of the tracked parameters as of the last `refresh_trainable`: FSDP2's `fully_shard` replaces every
        # parameter object but keeps the names, so the names still find the (now sharded) parameters.
        self.tracked_names: dict[str, tuple[AppliedMethod, str]] = {}

    def add(self, entry: AppliedMethod) -> None:
        self.applied.append(entry)

    def tracked(self) -> dict[int, tuple[AppliedMethod, str]]:
        """id(parameter) -> (method, group) for every parameter a method added or unfroze."""
        return {id(p): (entry, group) for entry in self.applied for group, ps in entry.parameters.items() for p in ps}

    def names(self) -> list[str]:
        return [entry.name for entry in self.applied]

    def methods(self) -> list[AppliedMethod]:
        """The applied plugin methods, without built-in parts such as the connector."""
        return [entry for entry in self.applied if entry.method is not None]


def state_of(model: nn.Module, create: bool = True) -> AdapterState | None:
    state = model.__dict__.get(STATE_ATTRIBUTE)
    if state is None and create:
        state = AdapterState()
        model.__dict__[STATE_ATTRIBUTE] = state
    return state


def refresh_trainable(model: nn.Module) -> None:
    """Make exactly the tracked parameters trainable and freeze everything else."""
    state = state_of(model)
    tracked = state.tracked()
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in tracked)
    state.tracked_names = {name: tracked[id(p)] for name, p in model.named_parameters() if id(p) in tracked}


def named_tracked_parameters(model: nn.Module) -> dict[str, tuple[nn.Parameter, AppliedMethod, str]]:
    """Current qualified name -> (parameter, method, group) for every tracked parameter."""
    state = state_of(model)
    tracked = state.tracked()
    result = {}
    for name, parameter in model.named_parameters(remove_duplicate=True):
        owner = tracked.get(id(parameter)) or state.tracked_names.get(name)
        if owner is not None:
            result[name] = (parameter, *owner)
    return result
