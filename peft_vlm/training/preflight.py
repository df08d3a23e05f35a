"""Checks made when a trainer is built, before any step: what would otherwise fail late (after hours of training)
or not at all.

- The output folder must be a folder that can be written: with `checkpoint_every: 0` the first write comes after
  the last step, and the trained state would be lost with it.
- No applied method may be merged into the base weights: its parameters are then out of the model (or folded into
  frozen weights), so training would silently leave it as it is.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from torch import nn

from peft_vlm.errors import ConfigError
from peft_vlm.runtime.tracking import named_tracked_parameters, state_of


def check_output_dir(output_dir: str | os.PathLike) -> Path:
    """Create `output_dir` if needed and prove it writable; a `ConfigError` naming it otherwise."""
    path = Path(output_dir)
    option = f"TrainConfig.output_dir={str(output_dir)!r}"
    for folder in (path, path / "checkpoints", *path.parents):
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"{option}: '{folder}' is a file, not a folder; choose another output_dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as error:
        raise ConfigError(f"{option} cannot be written ({error.strerror or error}); choose a folder you can write") from None
    return path


def merged_methods(model: nn.Module) -> list[str]:
    """The applied methods that are merged into the base weights: by their `merged` flag (bias/scale), or, for a
    mergeable method without one, by its parameters no longer all being in the model (a merged LoRA puts the base
    layers back in place of its wrappers)."""
    state = state_of(model, create=False)
    if state is None:
        return []
    present: dict[int, int] = {}
    for _, entry, _ in named_tracked_parameters(model).values():
        present[id(entry)] = present.get(id(entry), 0) + 1
    merged = []
    for entry in state.methods():
        if not entry.method.mergeable:
            continue
        flag = getattr(entry.method, "merged", None)
        if flag is None:
            flag = present.get(id(entry), 0) < len({id(p) for ps in entry.parameters.values() for p in ps})
        if flag:
            merged.append(entry.name)
    return merged


def refuse_merged(model: nn.Module) -> None:
    merged = merged_methods(model)
    if merged:
        raise ConfigError(
            f"method(s) {', '.join(merged)} are merged into the base weights, so training would not update them: "
            "call pv.unmerge(model) before training (and pv.merge again afterwards)"
        )
