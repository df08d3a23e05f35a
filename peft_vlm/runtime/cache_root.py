"""The folder under which peft_vlm keeps what it computes once and reuses (converted models, pretrained towers,
vision features): `$PEFT_VLM_CACHE`, else `~/.cache/peft_vlm`."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("PEFT_VLM_CACHE", Path.home() / ".cache" / "peft_vlm"))
