"""Ctrl-C (SIGINT) or SIGTERM during training asks the run to stop after the step in progress, with a checkpoint.

While `StopRequest` is entered (the training loop), the first such signal only records itself; the trainer checks
after each optimizer step, saves a checkpoint at that step and stops, so a rerun resumes exactly where it was
interrupted. The handlers before it are put back at once, so a second Ctrl-C stops at once as it always did. In a
run of several processes the request is shared each step (any process asked: all stop at the same step).
Outside the main thread no handler can be installed and signals act as before.
"""
from __future__ import annotations

import signal
import threading

import torch

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {number: signal.signal(number, self._record) for number in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _record(self, number, frame) -> None:
        self.received = number
        self._restore()  # a second signal acts as it would without us

    def _restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def requested(self, accelerator) -> str | None:
        """The signal's name if this process (or, in a multi-process run, any process) received one."""
        received = self.received or 0
        if accelerator.num_processes > 1:
            received = int(accelerator.reduce(torch.tensor(received, device=accelerator.device), "max"))
        return signal.Signals(received).name if received else None
