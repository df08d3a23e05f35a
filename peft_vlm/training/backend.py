"""The training backend: how `JointTrainer`'s steps reach the processes and devices, behind one small interface (the
way Prismatic's training strategies are split). Two implementations:

- `AccelerateBackend` (`peft_vlm.training.accelerate_backend`): one process, DDP or FSDP2 through `accelerate`, one
  AdamW per data stream, stepped after the last micro-batch;
- `DeepSpeedBackend` (`peft_vlm.training.deepspeed`): a DeepSpeed ZeRO engine owning one AdamW whose param groups
  are tagged with their stream, stepped by the engine inside the last micro-batch's backward.

A step, as the trainer drives it:

    with backend.training(stream):
        for each micro-batch:
            with backend.sync(last), accelerator.autocast():
                loss = model(batch).loss  (or backend.empty_loss(...) when every row of it was bad)
                backend.backward(loss, micro_batches, update=(stream,) or () with the last micro-batch)
    backend.step()

A non-finite loss still goes backward (every process takes part in every collective); the step then updates nothing
and its gradients are dropped.
"""
from __future__ import annotations

import contextlib
import warnings
from abc import ABC, abstractmethod
from typing import Callable, ClassVar, Iterable

import torch
from accelerate import Accelerator
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from peft_vlm.training.config import TrainConfig, native_bf16, resolve_mixed_precision

#: make_groups(parameters by name) -> {stream: AdamW param groups}; every group carries "names" and "stream".
GroupMaker = Callable[[dict[str, nn.Parameter]], dict[str, list[dict]]]


class Backend(ABC):
    #: Whether checkpoints hold a DeepSpeed engine's own (partitioned) state; a checkpoint resumes only the same way.
    deepspeed: ClassVar[bool] = False

    def __init__(self, config: TrainConfig):
        self.config = config
        mixed_precision = resolve_mixed_precision(config.mixed_precision)
        if mixed_precision == "bf16" and not native_bf16():
            warnings.warn("mixed_precision='bf16' on a CPU without native bf16 kernels (no AVX-512 or AMX): bf16 "
                          "matmuls are emulated here, many times slower than fp32; 'bf16-native' trains in fp32 on "
                          "such a CPU", stacklevel=2)
        _allow_precision(mixed_precision)
        self.accelerator = Accelerator(mixed_precision=mixed_precision, log_with=config.report_to,
                                       project_dir=config.output_dir, **self.accelerator_options())
        self.model: nn.Module | None = None  # what the trainer runs: the model, its DDP/FSDP2 wrapper or the engine
        self.unwrapped: nn.Module | None = None

    @abstractmethod
    def accelerator_options(self) -> dict:
        """Keyword arguments for `Accelerator`."""

    @abstractmethod
    def prepare(self, model: nn.Module, make_groups: GroupMaker) -> nn.Module:
        """Wrap the model for the processes and create the optimizer(s); returns the model to run."""

    def _prepared(self, model: nn.Module, streams: Iterable[str]) -> nn.Module:
        """Record the prepared model and each stream's trained parameters (as the prepared model holds them)."""
        self.model, self.unwrapped = model, self.accelerator.unwrap_model(model)
        named = dict(self.unwrapped.named_parameters())
        self.stream_parameters = {
            stream: [named[n] for group in self.param_groups(stream) for n in group["names"]] for stream in streams
        }
        return model

    @abstractmethod
    def param_groups(self, stream: str) -> list[dict]:
        """The optimizer's param groups of one stream (the trainer sets their `lr`)."""

    def training(self, stream: str):
        """Context of one step on `stream`."""
        return contextlib.nullcontext()

    @abstractmethod
    def sync(self, last: bool):
        """Context of one micro-batch's forward and backward; `last`: the step's last micro-batch."""

    @abstractmethod
    def empty_loss(self, parameters: list[nn.Parameter], stand_in: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A zero loss for a micro-batch that lost every row, whose backward keeps the processes in step;
        `stand_in()` runs the model on another slot of the same step."""

    @abstractmethod
    def backward(self, loss: torch.Tensor, micro_batches: int, update: tuple[str, ...] | None = None) -> None:
        """Backward of one of `micro_batches` micro-batches; with the last one, `update` names the streams whose
        groups this step updates (`()`: none, the step is skipped)."""

    @abstractmethod
    def step(self) -> None:
        """End the step: update the groups named with the last backward and drop every gradient."""

    def gathered(self, parameters: Iterable[nn.Parameter]):
        """Context in which partitioned parameters are whole (every process must enter it)."""
        return contextlib.nullcontext()

    def full_tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named parameters in full, gathered from the shards where they are sharded (FSDP2, ZeRO-3; every
        process must call this; each gets the full tensors), on the CPU."""
        parameters = dict(self.unwrapped.named_parameters())
        with self.gathered(parameters[name] for name in names):
            return {name: full(parameters[name]).cpu().clone() for name in names}

    def optimizer_states(self) -> dict[str, dict]:
        """{stream: {"state": {parameter name: {key: full tensor}}, "param_groups": [...]}} for a checkpoint's
        `optimizer.safetensors`; empty where the backend keeps its own state (`save_state`)."""
        return {}

    def save_state(self, folder) -> None:
        """Write what `optimizer_states` does not cover into a checkpoint folder (every process its part)."""

    @abstractmethod
    def load_state(self, folder, tensors: dict[str, torch.Tensor], optimizer_states: dict[str, dict]) -> None:
        """Restore the trained parameters and the optimizer state of a checkpoint."""


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach()


def placed_like(parameter: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A saved full tensor placed like `parameter` (sharded the same way under FSDP2); scalars (step) stay as saved."""
    if isinstance(parameter, DTensor) and value.dim() > 0:
        return distribute_tensor(value.to(parameter.dtype), parameter.device_mesh, parameter.placements)
    return value.to(parameter.device) if value.dim() > 0 else value


def _allow_precision(mixed_precision: str) -> None:
    """accelerate keeps one state per process and refuses a second `Accelerator` with another precision; in a single
    process (two recipes in a row, a benchmark comparing runs) nothing else shares that state, so it starts afresh."""
    from accelerate.state import AcceleratorState, PartialState

    if AcceleratorState._shared_state and PartialState().num_processes == 1:
        if AcceleratorState().mixed_precision != mixed_precision:
            AcceleratorState._reset_state()
