"""Checkpoints: adapter tensors, optimizer states, schedules, RNG states and data positions, written atomically.

A checkpoint is a folder `checkpoints/step-0000100/` with
- `adapter.safetensors`: the trained tensors (full, also after sharded training) with the adapter metadata,
  loadable by itself with `pv.load_adapter`;
- `optimizer.safetensors`: every optimizer's state, keyed `optimizer/STREAM/PARAMETER/KEY`;
- `rng-rankN.safetensors`: each process's torch (and CUDA) RNG state;
- `deepspeed/` under DeepSpeed: the engine's own checkpoint (partitioned optimizer state, trained parameters);
- `trainer_state.json`: step, data positions, schedules, Python/NumPy RNG states, loss history.
It is written under a temporary name and renamed when complete, so a run killed while writing leaves no
half-written checkpoint behind. No pickle: tensors are safetensors, the rest is JSON.

At least one checkpoint is always kept, whatever `keep_checkpoints` says. On resume every file of the newest
checkpoint is read before anything is restored; one that is missing, truncated or not what it should be (a disk
that filled up, a copy cut short) makes the checkpoint skipped: it is logged with the reason, renamed to
`step-NNNNNNN.corrupt` (kept for inspection, out of the rotation) and the next newest intact one is used.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from peft_vlm.errors import ConfigError, PeftVlmError
from peft_vlm.methods.adapter_file import write_adapter
from peft_vlm.runtime.file_modes import like_other_outputs

CHECKPOINT_PATTERN = re.compile(r"^step-(\d+)$")
REPLACED = ".tmp-replaced"  # a checkpoint being replaced by a newer write of the same step
STATE_KEYS = ("step", "skipped_steps", "nonfinite_in_row", "streams", "history", "param_groups")
log = logging.getLogger(__name__)


class CorruptCheckpointError(PeftVlmError):
    """A checkpoint folder with a file that is missing, truncated or malformed (the message names both)."""


@dataclass
class Checkpoint:
    """Everything a checkpoint folder holds, read and checked, nothing restored yet."""

    folder: Path
    state: dict[str, Any]
    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    rng: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = field(default=None, repr=False)  # this process's


def checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step:07d}"


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoint folders in `output_dir`, oldest first."""
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    steps = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()]
    return [path for _, path in sorted(steps)]


def remove_interrupted(output_dir: str | os.PathLike) -> None:
    """Drop the temporary folders of interrupted writes; a checkpoint that a write of the same step was replacing
    when it stopped comes back."""
    folder = Path(output_dir) / "checkpoints"
    for path in sorted(folder.iterdir()) if folder.is_dir() else ():
        if path.name.endswith(REPLACED) and not (original := path.with_name(path.name[: -len(REPLACED)])).exists():
            os.replace(path, original)
        elif ".tmp" in path.name:
            shutil.rmtree(path, ignore_errors=True)


def remove_stale(output_dir: str | os.PathLike, keep: int) -> None:
    """Drop interrupted writes and all but the newest `keep` checkpoints (at least one is always kept: a run started
    again must find where it stopped)."""
    remove_interrupted(output_dir)
    complete = checkpoints(output_dir)
    for path in complete[: max(0, len(complete) - max(1, keep))]:
        shutil.rmtree(path, ignore_errors=True)


def flatten_optimizer_states(states: dict[str, dict]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """{stream: full optimizer state dict keyed by parameter name} -> (tensors, JSON-able rest)."""
    tensors, rest = {}, {}
    for stream, state in states.items():
        for name, values in state["state"].items():
            for key, value in values.items():
                tensors[f"optimizer/{stream}/{name}/{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
        rest[stream] = state["param_groups"]
    return tensors, rest


def unflatten_optimizer_states(tensors: dict[str, torch.Tensor], param_groups: dict[str, Any]) -> dict[str, dict]:
    states: dict[str, dict] = {stream: {"state": {}, "param_groups": groups} for stream, groups in param_groups.items()}
    for flat_key, tensor in tensors.items():
        _, stream, rest = flat_key.split("/", 2)
        name, key = rest.rsplit("/", 1)
        states[stream]["state"].setdefault(name, {})[key] = tensor
    return states


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    numpy_state = np.random.get_state()
    python = {"python": _jsonable(random.getstate()),
              "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]]}
    return tensors, python


def set_rng_state(tensors: dict[str, torch.Tensor], python: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    random.setstate(_tuples(python["python"]))
    kind, keys, *others = python["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *others))


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def write_checkpoint(
    folder: Path,
    adapter_writer,
    optimizer_tensors: dict[str, torch.Tensor],
    state: dict[str, Any],
    rank: int,
    is_main: bool,
    barrier,
    write_shards=None,
) -> None:
    """Every process writes its RNG state (and, with `write_shards(folder)`, its part of a partitioned state) into a
    temporary folder; the main process writes the rest, then renames."""
    temporary = folder.with_name(folder.name + ".tmp")
    if is_main:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    barrier()
    rng_tensors, rng_python = rng_state()
    save_file(rng_tensors, str(temporary / f"rng-rank{rank}.safetensors"))
    (temporary / f"rng-rank{rank}.json").write_text(json.dumps(rng_python))
    if write_shards is not None:
        write_shards(temporary)
    if is_main:
        adapter_writer(temporary / "adapter.safetensors")
        save_file(optimizer_tensors, str(temporary / "optimizer.safetensors"))
        (temporary / "trainer_state.json").write_text(json.dumps(state, indent=1))
    barrier()
    if is_main:
        like_other_outputs(temporary)
    if is_main:  # a checkpoint of the same step (a finished run started again) goes aside first, never missing
        replaced = folder.with_name(folder.name + REPLACED)
        shutil.rmtree(replaced, ignore_errors=True)
        if folder.exists():
            os.replace(folder, replaced)
        os.replace(temporary, folder)
        shutil.rmtree(replaced, ignore_errors=True)
    barrier()


def read(folder: Path, rank: int) -> Checkpoint:
    """Read and check every file of a checkpoint folder (this process's RNG state among them); restores nothing.
    Raises `CorruptCheckpointError` naming the folder and the file at fault."""
    folder = Path(folder)
    state = _json(folder / "trainer_state.json")
    missing = [key for key in STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CorruptCheckpointError(f"checkpoint '{folder}': trainer_state.json lacks {', '.join(missing)}")
    if state.get("deepspeed") and not (folder / "deepspeed").is_dir():
        raise CorruptCheckpointError(f"checkpoint '{folder}': the DeepSpeed engine's state (deepspeed/) is missing")
    adapter, optimizer = _tensors(folder / "adapter.safetensors"), _tensors(folder / "optimizer.safetensors")
    checkpoint = Checkpoint(folder, state, adapter, optimizer)
    for rng_file in sorted(folder.glob("rng-rank*.safetensors")):  # every process's, so that all decide alike
        rng = _tensors(rng_file), _json(rng_file.with_suffix(".json"))
        if rng_file.name == f"rng-rank{rank}.safetensors":
            checkpoint.rng = rng
    return checkpoint


def newest_intact(output_dir: str | os.PathLike, rank: int) -> tuple[Checkpoint | None, list[tuple[Path, str]]]:
    """The newest checkpoint that reads completely, and the newer ones skipped with the reason for each."""
    skipped = []
    for folder in reversed(checkpoints(output_dir)):
        try:
            return read(folder, rank), skipped
        except CorruptCheckpointError as error:
            skipped.append((folder, str(error)))
    return None, skipped


def resume_point(output_dir: str | os.PathLike, accelerator, keep: int, resume: bool,
                 fits: Callable[[Checkpoint], None] = lambda checkpoint: None) -> Checkpoint | None:
    """At the start of a run (every process must call this): drop interrupted writes, find the checkpoint to resume
    from (with `resume`), move the corrupt newer ones aside, logging each, and keep the newest `keep` of the rest.
    `fits(checkpoint)` raises when this run cannot continue it (other methods): before any checkpoint is moved or
    removed, so that the refused run leaves the folder as it found it."""
    if accelerator.is_main_process:
        remove_interrupted(output_dir)
    accelerator.wait_for_everyone()
    checkpoint, skipped = newest_intact(output_dir, accelerator.process_index) if resume else (None, [])
    if checkpoint is not None:
        fits(checkpoint)  # every process read the same checkpoint, so every process refuses alike
    accelerator.wait_for_everyone()  # every process has read before any folder is renamed
    if accelerator.is_main_process:
        for folder, reason in skipped:
            aside = folder.with_name(folder.name + ".corrupt")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(folder, aside)
            log.warning("skipped %s; moved it to '%s'", reason, aside)
        if checkpoint is not None:
            log.info("resuming from checkpoint '%s' (step %d)", checkpoint.folder, checkpoint.state["step"])
        elif skipped:
            log.warning("no intact checkpoint in '%s': training starts from step 0", Path(output_dir) / "checkpoints")
        remove_stale(output_dir, keep=keep)
    accelerator.wait_for_everyone()
    return checkpoint


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CorruptCheckpointError(f"checkpoint '{path.parent}': {path.name} is missing") from None
    except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CorruptCheckpointError(
            f"checkpoint '{path.parent}': {path.name} is truncated or corrupt ({error})") from None


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CorruptCheckpointError(f"checkpoint '{path.parent}': {path.name} is missing")
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as error:
        raise CorruptCheckpointError(
            f"checkpoint '{path.parent}': {path.name} is truncated or corrupt ({error})") from None


def save(output_dir: str | os.PathLike, step: int, backend, adapter_tensors: dict[str, torch.Tensor],
         metadata: dict[str, str], state: dict[str, Any], keep: int) -> Path:
    """Write the checkpoint of `step` (every process must call this): the adapter tensors with their metadata, the
    backend's optimizer state, the trainer's `state`; then drop all but the newest `keep` checkpoints."""
    accelerator = backend.accelerator
    folder = checkpoint_dir(output_dir, step)
    optimizer_tensors, param_groups = flatten_optimizer_states(backend.optimizer_states())
    state = {**state, "param_groups": param_groups, "world_size": accelerator.num_processes,
             "deepspeed": backend.deepspeed}
    write_checkpoint(
        folder,
        lambda path: write_adapter(path, adapter_tensors, metadata),
        optimizer_tensors,
        state,
        rank=accelerator.process_index,
        is_main=accelerator.is_main_process,
        barrier=accelerator.wait_for_everyone,
        write_shards=backend.save_state,
    )
    if accelerator.is_main_process:
        remove_stale(output_dir, keep=keep)
    return folder


def check_fits(checkpoint: Checkpoint, deepspeed: bool, output_dir: str | os.PathLike,
               trained_names: list[str]) -> None:
    """A ConfigError unless a run with these trained tensors (and DeepSpeed or not) can continue `checkpoint`."""
    folder, state = checkpoint.folder, checkpoint.state
    where = f"start in a new output_dir (TrainConfig.output_dir={str(output_dir)!r})"
    if state.get("deepspeed", False) != deepspeed:
        raise ConfigError(f"checkpoint '{folder}' was written {'with' if state.get('deepspeed') else 'without'} "
                          f"DeepSpeed; resume it the same way, or {where}")
    if sorted(checkpoint.adapter) != sorted(trained_names):
        saved, trained = set(checkpoint.adapter), set(trained_names)
        extra, missing = sorted(saved - trained), sorted(trained - saved)
        raise ConfigError(f"checkpoint '{folder}' was written for other methods "
                          f"(tensors not trained here: {extra[:3]}, "
                          f"trained here but not in it: {missing[:3]}); {where}")


def load(checkpoint: Checkpoint, backend, output_dir: str | os.PathLike, trained_names: list[str]) -> dict[str, Any]:
    """Restore this process's RNG states, the trained parameters and the optimizer states of `checkpoint`;
    returns the trainer state it holds."""
    check_fits(checkpoint, backend.deepspeed, output_dir, trained_names)
    folder, state = checkpoint.folder, checkpoint.state
    if checkpoint.rng is not None:
        set_rng_state(*checkpoint.rng)
    backend.load_state(folder, checkpoint.adapter,
                       unflatten_optimizer_states(checkpoint.optimizer, state["param_groups"]))
    return state
