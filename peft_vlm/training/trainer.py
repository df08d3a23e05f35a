"""`JointTrainer`: caption batches and instruction batches update disjoint parameter groups (LLaMA-Adapter V2 sec
4.2), each group with its own AdamW state, through `accelerate` (one process, DDP, FSDP2, DeepSpeed ZeRO; bf16 on GPU).

Every step is one kind of batch: `caption_ratio` of the steps are caption steps, which update the `vision` group
(connector, early fusion, ...); the others are instruction steps, which update the `language` group (prompts, gates,
bias/scale, LoRA, ...). The optimizer of the group not being trained is not stepped, so neither its weight decay nor
its momentum moves anything. With `data=` instead, every step updates every trainable parameter (LoRA, experts).
Under DeepSpeed the engine owns a single optimizer: one AdamW whose param groups are tagged with their stream and that
steps the groups of the stream being trained only (see `peft_vlm.training.deepspeed`).

Data order is a seeded permutation per stream and epoch; a checkpoint records each stream's position, so a resumed
run sees exactly the batches the uninterrupted run would have seen.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from peft_vlm.data.collate import Collator
from peft_vlm.errors import ConfigError, PeftVlmError
from peft_vlm.methods.adapter_file import adapter_metadata, write_adapter
from peft_vlm.runtime.tracking import named_tracked_parameters
from peft_vlm.training import checkpoint as ckpt
from peft_vlm.training import deepspeed as ds
from peft_vlm.training.config import TrainConfig
from peft_vlm.training.reporting import Reporter
from peft_vlm.training.streams import DataStream, make_streams, micro_batches, param_groups, stand_in_batch, stream_for


class TrainingStopped(PeftVlmError):
    """Too many non-finite losses in a row; the run saved a checkpoint first."""


@dataclass
class TrainResult:
    steps: int
    history: list[dict]  # one entry per optimizer step: step, stream, loss, lr, skipped
    skipped_steps: int
    adapter_path: Path
    seconds: float


class JointTrainer:
    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        caption_data=None,
        instruction_data=None,
        data=None,
        collate_fn: Callable | None = None,
    ):
        self.config = config
        self.collate = collate_fn or Collator.for_model(model)
        tracked = named_tracked_parameters(model)
        if not tracked:
            raise ConfigError("the model has nothing to train: apply a method first (pv.apply)")
        self.group_of = {name: group for name, (_, _, group) in tracked.items()}
        self.streams, self.names_by_stream = make_streams(config, self.group_of, caption_data, instruction_data, data)
        self.trained_names = sorted(tracked)
        self.metadata = adapter_metadata(model)

        mixed_precision = config.mixed_precision
        if mixed_precision == "auto":
            mixed_precision = "bf16" if torch.cuda.is_available() else "no"
        self.deepspeed = ds.requested()
        if self.deepspeed:
            options = ds.accelerator_options(config)
        else:
            options = {"cpu": not torch.cuda.is_available(),
                       "kwargs_handlers": [DistributedDataParallelKwargs(find_unused_parameters=True)]}
        self.accelerator = Accelerator(mixed_precision=mixed_precision, log_with=config.report_to,
                                       project_dir=config.output_dir, **options)
        if config.gradient_checkpointing:
            model.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.deepspeed:  # one optimizer for the engine, created before ZeRO partitions the parameters
            parameters = dict(model.named_parameters())
            groups = [g for name, names in self.names_by_stream.items() for g in self._param_groups(parameters, name, names)]
            self.optimizer = ds.StreamAdamW(groups, betas=config.betas)
            self.model = ds.prepare(self.accelerator, model, self.optimizer, config)
            self.optimizers = {}
        else:
            self.model = self._distribute(model)
            parameters = dict(self.accelerator.unwrap_model(self.model).named_parameters())
            self.optimizers = {
                name: torch.optim.AdamW(self._param_groups(parameters, name, names), betas=config.betas)
                for name, names in self.names_by_stream.items()
            }
        self.unwrapped = self.accelerator.unwrap_model(self.model)
        named = dict(self.unwrapped.named_parameters())
        self.stream_parameters = {
            name: [named[n] for group in self._optimizer_groups(name) for n in group["names"]] for name in self.streams
        }
        self.step, self.skipped_steps, self.nonfinite_in_row, self.history = 0, 0, 0, []

    # -- set-up ----------------------------------------------------------------------------------------------------
    def _distribute(self, model: nn.Module) -> nn.Module:
        if self.config.sharding == "fsdp2" and self.accelerator.num_processes > 1 and not torch.cuda.is_available():
            # accelerate's FSDP plugin needs GPUs (on CPU it silently falls back to DDP), so shard with torch's
            # FSDP2 directly: every decoder layer, then the rest.
            from torch.distributed.fsdp import fully_shard

            for layer in model.language_model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            return model
        return self.accelerator.prepare(model)

    def _param_groups(self, parameters: dict[str, nn.Parameter], stream: str, names: list[str]) -> list[dict]:
        return param_groups(self.config, parameters, self.group_of, stream, names)

    def lr_factor(self, step: int) -> float:
        """Linear warm-up, then cosine decay to `min_lr_ratio` (or constant) over `max_steps`."""
        config = self.config
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.lr_schedule == "constant":
            return 1.0
        progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def stream_for(self, step: int) -> DataStream:
        return stream_for(self.streams, self.config.caption_ratio, step)

    # -- one step --------------------------------------------------------------------------------------------------
    def _train_step(self, stream: DataStream) -> dict[str, float]:
        parameters = self.stream_parameters[stream.name]
        factor = self.lr_factor(self.step)
        for group in self._optimizer_groups(stream.name):
            group["lr"] = group["initial_lr"] * factor
        batches, slots = micro_batches(stream, self.collate, self.config, self.accelerator.num_processes,
                                       self.accelerator.process_index)
        device = self.accelerator.device
        total_loss, tokens, finite = torch.zeros((), device=device), 0, True
        with self._others_frozen(stream):
            for micro, batch in enumerate(batches):
                last = micro == len(batches) - 1
                with self._sync(last), self.accelerator.autocast():
                    if len(batch):
                        loss = self.model(**{k: v.to(device) for k, v in batch.items()}).loss
                        tokens += int(batch["attention_mask"].sum())
                    elif self.deepspeed:
                        stand_in = stand_in_batch(stream, self.collate, slots, self.step)
                        loss = self.model(**{k: v.to(device) for k, v in stand_in.items()}).loss * 0
                    else:  # every row of this micro-batch was skipped; keep the collective backward in step
                        loss = sum((p * 0).sum() for p in parameters)
                    if not torch.isfinite(loss):
                        finite = False
                        if not self.deepspeed:  # under DeepSpeed it goes backward: no group steps, the engine drops the grads
                            loss = sum((p * 0).sum() for p in parameters)
                    if last:  # known before the last backward, which under DeepSpeed also steps
                        all_finite = bool(self.accelerator.gather(torch.tensor([finite], device=device)).all())
                        if self.deepspeed:
                            self.optimizer.active = (stream.name,) if all_finite else ()
                    # DeepSpeed divides by its gradient_accumulation_steps itself (set from the recipe)
                    self.accelerator.backward(loss if self.deepspeed else loss / len(batches))
                total_loss += loss.detach().float() / len(batches)
        if not self.deepspeed:
            if all_finite:
                if self.config.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(parameters, self.config.max_grad_norm)
                self.optimizers[stream.name].step()
            for other in self.optimizers.values():  # grads of groups not stepped must not leak into later steps
                other.zero_grad(set_to_none=True)
        if all_finite:
            self.nonfinite_in_row = 0
        else:
            self.skipped_steps += 1
            self.nonfinite_in_row += 1
        mean_loss = self.accelerator.reduce(total_loss, "mean").item()
        return {"loss": mean_loss if all_finite else float("nan"), "tokens": tokens * self.accelerator.num_processes,
                "lr": self.config.learning_rate * factor, "skipped": not all_finite}

    def _optimizer_groups(self, stream: str) -> list[dict]:
        if self.deepspeed:
            return [group for group in self.optimizer.param_groups if group["stream"] == stream]
        return self.optimizers[stream].param_groups

    def _sync(self, last: bool):
        if self.deepspeed:  # the engine reduces and steps at the end of accumulation
            return self.accelerator.accumulate(self.model)
        if last or self.config.sharding == "fsdp2":
            return contextlib.nullcontext()
        return self.accelerator.no_sync(self.model)

    @contextlib.contextmanager
    def _others_frozen(self, stream: DataStream):
        """Under DeepSpeed the other streams' parameters get no gradient in this step, so that the engine's gradient
        clipping measures this stream's gradients only (without DeepSpeed, `_train_step` clips them alone)."""
        others = [p for name, ps in self.stream_parameters.items() if name != stream.name for p in ps] if self.deepspeed else []
        for parameter in others:
            parameter.requires_grad_(False)
        try:
            yield
        finally:
            for parameter in others:
                parameter.requires_grad_(True)

    # -- the run ---------------------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        config, accelerator = self.config, self.accelerator
        start = time.time()
        if accelerator.is_main_process:
            ckpt.remove_stale(config.output_dir, keep=config.keep_checkpoints)
        accelerator.wait_for_everyone()
        if config.resume and (latest := ckpt.latest_checkpoint(config.output_dir)) is not None:
            self.load_checkpoint(latest)
        reporter = Reporter(config, accelerator, list(self.streams))
        reporter.start(self.step)
        self.model.train()
        while self.step < config.max_steps:
            stream = self.stream_for(self.step)
            tick = time.time()
            metrics = self._train_step(stream)
            self.history.append({"step": self.step, "stream": stream.name, "loss": metrics["loss"], "lr": metrics["lr"],
                                 "skipped": metrics["skipped"]})
            self.step += 1
            reporter.step(self.step, stream.name, metrics, time.time() - tick)
            if self.nonfinite_in_row >= config.max_nonfinite_steps:
                path = self.save_checkpoint()
                raise TrainingStopped(
                    f"{self.nonfinite_in_row} steps in a row had a non-finite loss (last at step {self.step}); "
                    f"stopped with a checkpoint at '{path}'"
                )
            if config.checkpoint_every and self.step % config.checkpoint_every == 0 and self.step < config.max_steps:
                self.save_checkpoint()
        reporter.close()
        self.save_checkpoint()
        adapter_path = self.save_adapter(Path(config.output_dir) / "adapter.safetensors")
        reporter.finish(self.history)
        return TrainResult(self.step, self.history, self.skipped_steps, adapter_path, time.time() - start)

    # -- files -----------------------------------------------------------------------------------------------------
    def full_tensors(self) -> dict[str, torch.Tensor]:
        """Every trained tensor in full, gathered from the shards where parameters are sharded (FSDP2, ZeRO-3; all
        processes must call this; each gets the full tensors)."""
        parameters = dict(self.unwrapped.named_parameters())
        with ds.gathered(parameters[name] for name in self.trained_names):
            return {name: _full(parameters[name]).cpu().clone() for name in self.trained_names}

    def save_adapter(self, path: Path) -> Path:
        tensors = self.full_tensors()
        if self.accelerator.is_main_process:
            write_adapter(path, tensors, self.metadata)
        self.accelerator.wait_for_everyone()
        return Path(path)

    def save_checkpoint(self) -> Path:
        folder = ckpt.checkpoint_dir(self.config.output_dir, self.step)
        tensors = self.full_tensors()
        optimizer_states = {name: self._optimizer_state(opt) for name, opt in self.optimizers.items()}
        optimizer_tensors, param_groups = ckpt.flatten_optimizer_states(optimizer_states)
        state = {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "nonfinite_in_row": self.nonfinite_in_row,
            "streams": {name: stream.cursor() for name, stream in self.streams.items()},
            "param_groups": param_groups,
            "history": self.history,
            "world_size": self.accelerator.num_processes,
            "deepspeed": self.deepspeed,
        }
        ckpt.write_checkpoint(
            folder,
            lambda path: write_adapter(path, tensors, self.metadata),
            optimizer_tensors,
            state,
            rank=self.accelerator.process_index,
            is_main=self.accelerator.is_main_process,
            barrier=self.accelerator.wait_for_everyone,
            write_shards=(lambda temporary: ds.save_state(self.model, temporary / "deepspeed")) if self.deepspeed else None,
        )
        if self.accelerator.is_main_process:
            ckpt.remove_stale(self.config.output_dir, keep=self.config.keep_checkpoints)
        return folder

    def load_checkpoint(self, folder: Path) -> None:
        from safetensors.torch import load_file

        optimizer_tensors, state = ckpt.read_checkpoint(folder, self.accelerator.process_index)
        if state.get("deepspeed", False) != self.deepspeed:
            raise ConfigError(
                f"checkpoint '{folder}' was written {'with' if state.get('deepspeed') else 'without'} DeepSpeed; resume "
                f"it the same way, or start in a new output_dir (TrainConfig.output_dir={self.config.output_dir!r})"
            )
        if self.deepspeed:  # trained parameters and the partitioned optimizer state
            ds.load_state(self.model, folder / "deepspeed")
        else:
            parameters = dict(self.unwrapped.named_parameters())
            with torch.no_grad():
                for name, tensor in load_file(str(folder / "adapter.safetensors")).items():
                    _assign(parameters[name], tensor)
            states = ckpt.unflatten_optimizer_states(optimizer_tensors, state["param_groups"])
            for name, optimizer in self.optimizers.items():
                self._load_optimizer_state(optimizer, states[name], parameters)
        for name, cursor in state["streams"].items():
            self.streams[name].restore(cursor)
        self.step, self.skipped_steps = state["step"], state["skipped_steps"]
        self.nonfinite_in_row, self.history = state["nonfinite_in_row"], state["history"]

    @staticmethod
    def _optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
        states = {}
        for group in optimizer.param_groups:
            for name, parameter in zip(group["names"], group["params"]):
                if parameter in optimizer.state:
                    states[name] = {key: _full(value) for key, value in optimizer.state[parameter].items()}
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        return {"state": states, "param_groups": groups}

    @staticmethod
    def _load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict, parameters: dict) -> None:
        for group in optimizer.param_groups:
            for name, parameter in zip(group["names"], group["params"]):
                if name in saved["state"]:
                    optimizer.state[parameter] = {key: _like(parameter, value) for key, value in saved["state"][name].items()}


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach()


def _like(parameter: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A saved full tensor placed like `parameter` (sharded the same way under FSDP2); scalars (step) stay as saved."""
    if isinstance(parameter, DTensor) and value.dim() > 0:
        return distribute_tensor(value.to(parameter.dtype), parameter.device_mesh, parameter.placements)
    return value.to(parameter.device) if value.dim() > 0 else value


def _assign(parameter: torch.Tensor, value: torch.Tensor) -> None:
    parameter.copy_(_like(parameter, value.to(parameter.dtype)))
