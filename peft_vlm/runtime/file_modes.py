"""Saved files get the mode any other output gets: 0666 less the umask (0644 under the usual umask 022).

safetensors creates its files readable by their owner only (0600), so an adapter, a checkpoint or an exported model
could not be read by the group that shares a results folder, unlike the metrics.json beside it.
"""
from __future__ import annotations

import os
from pathlib import Path


def umask() -> int:
    """The process's umask (setting it is the only way to read it; it is put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def like_other_outputs(*paths: str | os.PathLike) -> None:
    """Set each file (each file under a folder) to 0666 less the umask."""
    mode = 0o666 & ~umask()
    for path in map(Path, paths):
        for file in ([path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]):
            os.chmod(file, mode)
