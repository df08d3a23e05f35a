"""Third-party messages that are expected and harmless in a `peft-vlm` run, silenced narrowly, in one place.

`install()` is called by the command line and by `JointTrainer`, never on import of the library: a user who imports
`peft_vlm` keeps every message of the libraries beneath it until they train. Each entry names the logger that makes
the record, the message it matches, and why it says nothing to a `peft_vlm` user; everything else, warnings a user's
data, model or options cause included, still shows.
"""
from __future__ import annotations

import logging
import re

#: (logger name, message pattern, why it is harmless here)
HARMLESS = (
    ("bitsandbytes.backends.cpu.ops", r"Failed to load CPU gemm_4bit_forward from kernels-community",
     "bitsandbytes' optional CPU kernels for 4-bit matmuls: used only by load_in_4bit on a CPU, which falls back to "
     "bitsandbytes' own code; on import of peft, whether or not 4-bit is asked for"),
    ("DeepSpeed", r"Setting accelerator to CPU",
     "DeepSpeed, imported by accelerate, found no GPU: the run trains on the CPU as asked (DeepSpeed is used only "
     "under `accelerate launch` with a DeepSpeed config)"),
    ("transformers.utils.generic", r"`use_cache=True` is incompatible with gradient checkpointing",
     "train.gradient_checkpointing: training forwards need no KV cache; generation still uses one"),
)


class _Harmless(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


_installed: list[tuple[logging.Logger, _Harmless]] = []


def install() -> None:
    """Silence the `HARMLESS` messages (once per process; a second call does nothing)."""
    if _installed:
        return
    for name, pattern, _ in HARMLESS:
        # on the logger that makes the record: dropped there, it reaches no handler, whether or not its library
        # propagates to the root logger (transformers does when the environment sets CI)
        logger = logging.getLogger(name)
        harmless = _Harmless(pattern)
        logger.addFilter(harmless)
        _installed.append((logger, harmless))


def uninstall() -> None:
    """Show the `HARMLESS` messages again."""
    while _installed:
        target, harmless = _installed.pop()
        target.removeFilter(harmless)
