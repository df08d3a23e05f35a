"""Named presets: small YAML files in `adapters/` (installed as `peft_vlm.adapters`), each a list of method configs.

    # adapters/lora.yaml
    methods:
      - method: lora
        r: 8
        target_modules: [q_proj, v_proj]
"""
from __future__ import annotations

from importlib import resources
from typing import Any

import yaml

from peft_vlm.errors import ConfigError, UnknownMethodError
from peft_vlm.methods.registry import config_from_entry

PRESET_PACKAGE = "peft_vlm.adapters"


def _preset_files() -> dict[str, Any]:
    folder = resources.files(PRESET_PACKAGE)
    return {entry.name[: -len(".yaml")]: entry for entry in folder.iterdir() if entry.name.endswith(".yaml")}


def available_presets() -> list[str]:
    return sorted(_preset_files())


def load_preset(name: str) -> list[Any]:
    files = _preset_files()
    if name not in files:
        raise UnknownMethodError(f"unknown preset '{name}'; available presets: {', '.join(sorted(files))}")
    spec = yaml.safe_load(files[name].read_text()) or {}
    entries = spec.get("methods") if isinstance(spec, dict) else None
    if not isinstance(entries, list):
        raise ConfigError(f"preset '{name}': expected 'methods:' with a list of method entries")
    return [config_from_entry(entry, f"preset '{name}', method #{index + 1}") for index, entry in enumerate(entries)]


def preset_card(name: str) -> str:
    """The preset's card (adapters/NAME.md): what it reproduces and how to train it."""
    card = resources.files(PRESET_PACKAGE) / f"{name}.md"
    return card.read_text() if card.is_file() else ""
