"""One trainer per output folder: two runs writing the same checkpoints and adapter would corrupt each other's.

The main process holds an OS lock (`fcntl.flock`) on `output_dir/train.lock` for the whole run; the file names its
pid and host, so that a second trainer is refused at once with who has the folder. The operating system drops the
lock when its process ends, however it ends: a lock file left by a run that was killed is taken over.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
from contextlib import contextmanager
from pathlib import Path

import torch

from peft_vlm.errors import ConfigError

LOCK_NAME = "train.lock"


def _holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
        return f"pid {holder['pid']} on {holder['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its pid yet"


def take(output_dir: str | os.PathLike):
    """The open, locked lock file of `output_dir`, holding this process's pid and host; a `ConfigError` naming the
    holder when another process has it."""
    path = Path(output_dir) / LOCK_NAME
    while True:
        file = open(path, "a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.close()
            raise ConfigError(f"output_dir '{output_dir}' is in use by another trainer ({_holder(path)}); wait for "
                              "it to end or choose another output_dir") from None
        try:
            if os.fstat(file.fileno()).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        file.close()  # the lock of a file its holder removed as it ended: lock the new one
    file.truncate(0)
    file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    file.flush()
    return file


def release(file) -> None:
    Path(file.name).unlink(missing_ok=True)  # before unlocking: a run starting now locks a new file
    file.close()


@contextmanager
def training_lock(output_dir: str | os.PathLike, accelerator):
    """`output_dir` locked by the main process while the block runs; every process is refused when it is in use."""
    file, refusal = None, None
    if accelerator.is_main_process:
        try:
            file = take(output_dir)
        except ConfigError as error:
            refusal = error
    refused = accelerator.gather(torch.tensor([int(refusal is not None)], device=accelerator.device))
    if refusal is not None:
        raise refusal
    if bool(refused.any()):
        raise ConfigError(f"output_dir '{output_dir}' is in use by another trainer (named by the main process)")
    try:
        yield
    finally:
        if file is not None:
            release(file)
