"""Connectors: project the vision tower's patch tokens into the language model's embedding space.

Registered by name; `connector="mlp2x_gelu"` is LLaVA-1.5's projector, `"linear"` LLaVA-1's.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from peft_vlm.errors import ConfigError

_connectors: dict[str, Callable[[int, int], nn.Module]] = {}


def register_connector(name: str):
    def decorator(factory):
        _connectors[name] = factory
        return factory

    return decorator


class Connector(nn.Module):
    """Maps (images, tokens_in, vision_width) to (images, tokens_out, lm_hidden)."""

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return num_input_tokens


@register_connector("linear")
class LinearConnector(Connector):
    def __init__(self, vision_width: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(vision_width, hidden_size)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.proj(patches)


@register_connector("mlp2x_gelu")
class MlpConnector(Connector):
    def __init__(self, vision_width: int, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(vision_width, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.mlp(patches)


def available_connectors() -> list[str]:
    return sorted(_connectors)


def build_connector(name: str, vision_width: int, hidden_size: int) -> Connector:
    if name not in _connectors:
        raise ConfigError(f"unknown connector '{name}'; available connectors: {', '.join(available_connectors())}")
    return _connectors[name](vision_width, hidden_size)
