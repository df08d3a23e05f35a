"""Names of what a run writes for the user to look at: tracker tags (TensorBoard scalars)."""
from __future__ import annotations

import re


def tag(text: str) -> str:
    """One part of a tracker tag from a name such as "yes/no" ("yes_no"): a "/" would open another TensorBoard
    section."""
    return re.sub(r"[^0-9A-Za-z_.-]+", "_", str(text)).strip("_") or "none"
