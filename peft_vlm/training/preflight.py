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
from peft_vlm.methods.apply import is_merged


def check_output_dir(output_dir: str | os.PathLike) -> Path:
    """Create `output_dir` if needed and prove it writable (a probe file written and removed); a `ConfigError`
    naming it otherwise. Recipes call it before building the model, the trainer again when it is built."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output_dir '{path}' is a file, not a folder; choose another output_dir")
    for folder in (path / "checkpoints", *path.parents):
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"output_dir '{path}' lies in '{folder}', which is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as error:
        raise ConfigError(f"output_dir '{path}' is not writable ({error.strerror or error}); choose a folder you can "
                          "write") from None
    return path


def refuse_merged(model: nn.Module) -> None:
    merged = is_merged(model)
    if merged:
        raise ConfigError(
            f"method(s) {', '.join(merged)} are merged into the base weights, so training would not update them: "
            "call pv.unmerge(model) before training (and pv.merge again afterwards)"
        )
