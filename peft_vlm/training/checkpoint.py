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
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from peft_vlm.errors import ConfigError
from peft_vlm.methods.adapter_file import write_adapter

CHECKPOINT_PATTERN = re.compile(r"^step-(\d+)$")


def checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step:07d}"


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()]
    return max(steps)[1] if steps else None


def remove_stale(output_dir: str | os.PathLike, keep: int) -> None:
    """Drop temporary folders of interrupted writes and all but the newest `keep` checkpoints."""
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if ".tmp" in path.name:
            shutil.rmtree(path, ignore_errors=True)
    complete = sorted(p for p in folder.iterdir() if CHECKPOINT_PATTERN.match(p.name))
    for path in complete[: max(0, len(complete) - keep)]:
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
    python = {"python": _jsonable(random.getstate()), "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]]}
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
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(temporary, folder)
    barrier()


def read_checkpoint(folder: Path, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(optimizer tensors, trainer state) and restore this process's RNG states."""
    state = json.loads((folder / "trainer_state.json").read_text())
    rng_file = folder / f"rng-rank{rank}.safetensors"
    if rng_file.is_file():
        set_rng_state(load_file(str(rng_file)), json.loads((folder / f"rng-rank{rank}.json").read_text()))
    return load_file(str(folder / "optimizer.safetensors")), state


def save(output_dir: str | os.PathLike, step: int, backend, adapter_tensors: dict[str, torch.Tensor],
         metadata: dict[str, str], state: dict[str, Any], keep: int) -> Path:
    """Write the checkpoint of `step` (every process must call this): the adapter tensors with their metadata, the
    backend's optimizer state, the trainer's `state`; then drop all but the newest `keep` checkpoints."""
    accelerator = backend.accelerator
    folder = checkpoint_dir(output_dir, step)
    optimizer_tensors, param_groups = flatten_optimizer_states(backend.optimizer_states())
    state = {**state, "param_groups": param_groups, "world_size": accelerator.num_processes, "deepspeed": backend.deepspeed}
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


def load(folder: Path, backend, output_dir: str | os.PathLike) -> dict[str, Any]:
    """Restore this process's RNG states, the trained parameters and the optimizer states of the checkpoint in
    `folder`; returns the trainer state it holds."""
    optimizer_tensors, state = read_checkpoint(folder, backend.accelerator.process_index)
    if state.get("deepspeed", False) != backend.deepspeed:
        raise ConfigError(
            f"checkpoint '{folder}' was written {'with' if state.get('deepspeed') else 'without'} DeepSpeed; resume "
            f"it the same way, or start in a new output_dir (TrainConfig.output_dir={str(output_dir)!r})"
        )
    tensors = load_file(str(folder / "adapter.safetensors"))
    backend.load_state(folder, tensors, unflatten_optimizer_states(optimizer_tensors, state["param_groups"]))
    return state
