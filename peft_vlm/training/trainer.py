"""`JointTrainer`: caption batches and instruction batches update disjoint parameter groups (LLaMA-Adapter V2 sec
4.2), each group with its own AdamW state, through `accelerate` (one process, DDP, FSDP2, DeepSpeed ZeRO; bf16 on GPU).

Every step is one kind of batch (`peft_vlm.training.streams`): `caption_ratio` of the steps are caption steps, which
update the `vision` group (connector, early fusion, ...); the others are instruction steps, which update the
`language` group (prompts, gates, bias/scale, LoRA, ...). With `data=` instead, every step updates every trainable
parameter (LoRA, experts). How a step reaches the processes is the backend's business (`peft_vlm.training.backend`:
accelerate for one process, DDP and FSDP2; DeepSpeed ZeRO); what a run shows is `peft_vlm.training.reporting`'s.

Data order is a seeded permutation per stream and epoch; a checkpoint records each stream's position, so a resumed
run sees exactly the batches the uninterrupted run would have seen.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from peft_vlm.data.collate import Collator
from peft_vlm.data.dataset import TOO_MANY_SKIPPED
from peft_vlm.errors import ConfigError, DataError, PeftVlmError
from peft_vlm.methods.adapter_file import adapter_metadata, write_adapter
from peft_vlm.methods.model_card import write_model_card
from peft_vlm.runtime import quiet
from peft_vlm.runtime.packing import check_packing
from peft_vlm.runtime.tracking import named_tracked_parameters
from peft_vlm.training import checkpoint as ckpt
from peft_vlm.training import deepspeed as ds
from peft_vlm.training.accelerate_backend import AccelerateBackend
from peft_vlm.training.compiled_layers import compiled_decoder_layers, eagerly
from peft_vlm.training.config import TrainConfig
from peft_vlm.training.frozen_weights import frozen_linear_weights_in
from peft_vlm.training.preflight import check_output_dir, refuse_merged
from peft_vlm.training.reporting import Reporter
from peft_vlm.training.run_lock import training_lock
from peft_vlm.training.stop_request import StopRequest
from peft_vlm.training.streams import (DataStream, make_streams, micro_batches, param_groups, stand_in_batch,
                                       stream_for, untrained_groups)
from peft_vlm.training.vision_cache import cache_for_run

log = logging.getLogger(__name__)


def say_how_it_resumes(checkpoint: ckpt.Checkpoint, config: TrainConfig) -> None:
    """A warning when a rerun does not simply finish what it started: the folder's run is already at (or past)
    `max_steps`, so the adapter it returns is that run's, or it goes on to another `max_steps` than it began with."""
    step, started_with = checkpoint.state["step"], checkpoint.state.get("max_steps")
    if step >= config.max_steps:
        log.warning("'%s' holds a run already trained to step %d (max_steps=%d asked now): no step is trained; the "
                    "adapter returned is the one of step %d. To train anew, use another output_dir or resume=False",
                    config.output_dir, step, config.max_steps, step)
    elif started_with is not None and started_with != config.max_steps:
        log.warning("resuming the run in '%s' (started with max_steps=%d) at step %d and training on to "
                    "max_steps=%d: the learning-rate schedule now spans %d steps",
                    config.output_dir, started_with, step, config.max_steps, config.max_steps)


def warn_untrained_groups(group_of: dict[str, str], streams: dict[str, DataStream], config: TrainConfig) -> None:
    """One warning, at the start, for each trainable group that no stream of the run trains: its parameters would
    never move, yet the adapter saves them as trained."""
    for group, names in untrained_groups(group_of, streams).items():
        listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        feeders = [kind for kind, groups in (("caption", config.caption_groups),
                                             ("instruction", config.instruction_groups)) if group in groups]
        fed_by = (f"only {feeders[0]} batches train it and this run has no {feeders[0]}_data" if feeders else
                  "neither caption_groups nor instruction_groups names it")
        warnings.warn(f"trainable group '{group}' ({len(names)} parameter(s): {listed}) never moves in this run: "
                      f"{fed_by}; pass that data, or train with data= (every group)", UserWarning, stacklevel=3)


class TrainingStopped(PeftVlmError):
    """Too many non-finite losses in a row, or Ctrl-C / SIGTERM; the run saved a checkpoint first."""


@dataclass
class TrainResult:
    steps: int
    history: list[dict]  # one entry per optimizer step: step, stream, loss, lr, skipped
    skipped_steps: int
    adapter_path: Path
    seconds: float


class JointTrainer:
    """Trains the methods applied to `model`: caption and instruction batches on their own parameter groups, or
    every group at once with `data=`; `train()` runs (or resumes) the whole run and writes the adapter.

    `callbacks`: callables `callback(trainer, step)` run on the main process after every optimizer step, `step` the
    number of steps done (a periodic evaluation of `trainer.unwrapped`, say). Under sharded training (FSDP2, ZeRO-3)
    a callback must not run the model: its parameters are whole only while every process takes part.
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        caption_data=None,
        instruction_data=None,
        data=None,
        collate_fn: Callable | None = None,
        callbacks: list[Callable[["JointTrainer", int], None]] = (),
    ):
        refuse_merged(model)
        quiet.install()
        self.config = config
        self.callbacks = list(callbacks)
        if config.packing:  # refused now, before any step, naming the method that cannot take packed rows
            check_packing(model)
        self.collate = collate_fn or Collator.for_model(model, packing=config.packing)
        tracked = named_tracked_parameters(model)
        if not tracked:
            raise ConfigError("the model has nothing to train: apply a method first (pv.apply)")
        self.group_of = {name: group for name, (_, _, group) in tracked.items()}
        self.streams, self.names_by_stream = make_streams(config, self.group_of, caption_data, instruction_data, data)
        warn_untrained_groups(self.group_of, self.streams, config)
        self.trained_names = sorted(tracked)
        self.metadata = adapter_metadata(model)
        # now, not at the first checkpoint (with checkpoint_every 0: after all steps)
        check_output_dir(config.output_dir)
        if config.frozen_linears_in_bf16 and ds.requested():
            raise ConfigError("TrainConfig: frozen_linears_in_bf16=True is for single-process and DDP runs; "
                              "DeepSpeed keeps its own copies of the weights")
        if config.compile_layers and ds.requested():
            raise ConfigError("TrainConfig: compile_layers=True is for single-process and DDP runs, not DeepSpeed")
        self.backend = ds.DeepSpeedBackend(config) if ds.requested() else AccelerateBackend(config)
        self.accelerator = self.backend.accelerator
        self.vision_cache = cache_for_run(model, config, self.streams, self.accelerator.num_processes,
                                          sharded=self.deepspeed or config.sharding != "ddp")
        if config.gradient_checkpointing:
            language_model = model.language_model
            if hasattr(language_model, "activation_checkpointing_enable"):  # its name from transformers 5 on
                language_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = self.backend.prepare(model, self._param_groups)
        self.unwrapped, self.stream_parameters = self.backend.unwrapped, self.backend.stream_parameters
        self.step, self.skipped_steps, self.nonfinite_in_row, self.history = 0, 0, 0, []

    # -- set-up ----------------------------------------------------------------------------------------------------
    @property
    def deepspeed(self) -> bool:
        return self.backend.deepspeed

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """One AdamW per stream (empty under DeepSpeed, whose engine owns `optimizer`)."""
        return getattr(self.backend, "optimizers", {})

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The DeepSpeed engine's `StreamAdamW` (None without DeepSpeed)."""
        return getattr(self.backend, "optimizer", None)

    def _param_groups(self, parameters: dict[str, nn.Parameter]) -> dict[str, list[dict]]:
        return {stream: param_groups(self.config, parameters, self.group_of, stream, names)
                for stream, names in self.names_by_stream.items()}

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
        backend, device = self.backend, self.accelerator.device
        factor = self.lr_factor(self.step)
        for group in backend.param_groups(stream.name):
            group["lr"] = group["initial_lr"] * factor
        # every group's rate at this step, the other streams' too (theirs are set when they next train)
        group_lrs = {group.get("group", name): group["initial_lr"] * factor
                     for name in self.streams for group in backend.param_groups(name)}
        batches, slots = micro_batches(stream, self.collate, self.config, self.accelerator.num_processes,
                                       self.accelerator.process_index)
        self._stop_on_skipped_rows(stream, sum(len(batch) for batch in batches))
        total_loss, tokens, positions, finite = torch.zeros((), device=device), 0, 0, True
        with backend.training(stream.name):
            for micro, batch in enumerate(batches):
                last = micro == len(batches) - 1
                with backend.sync(last), self.accelerator.autocast():
                    if len(batch):
                        loss = self._loss(batch)
                        tokens += int(batch["attention_mask"].sum())
                        positions += batch["input_ids"].numel()
                    else:  # every row of this micro-batch was skipped as bad
                        loss = backend.empty_loss(
                            self.stream_parameters[stream.name],
                            lambda: self._loss(stand_in_batch(stream, self.collate, slots, self.step)))
                    finite = finite and bool(torch.isfinite(loss))
                    update = None
                    if last:  # a step with a non-finite loss on any process updates nothing
                        all_finite = bool(self.accelerator.gather(torch.tensor([finite], device=device)).all())
                        update = (stream.name,) if all_finite else ()
                    backend.backward(loss, len(batches), update)
                total_loss += loss.detach().float() / len(batches)
        backend.step()
        if all_finite:
            self.nonfinite_in_row = 0
        else:
            self.skipped_steps += 1
            self.nonfinite_in_row += 1
        mean_loss = self.accelerator.reduce(total_loss, "mean").item()
        return {"loss": mean_loss if all_finite else float("nan"), "tokens": tokens * self.accelerator.num_processes,
                "pad_share": 1 - tokens / positions if positions else 0.0,  # this process's share of padding
                "lr": self.config.learning_rate * factor, "group_lrs": group_lrs, "skipped": not all_finite}

    def _stop_on_skipped_rows(self, stream: DataStream, rows: int) -> None:
        """Every process stops together, with the skip report, when the step's whole batch was lost or any process
        skipped too many rows (`SampleDataset.skip_error`)."""
        if not hasattr(stream.dataset, "skip_error"):
            return
        error = stream.dataset.skip_error()
        counts = self.accelerator.gather(torch.tensor([[rows, error is not None]], device=self.accelerator.device))
        lost = int(counts[:, 0].sum()) == 0
        if lost or bool(counts[:, 1].any()):
            raise stream.dataset.skip_error(lost_batch=lost) or error or DataError(
                f"{stream.name} data", TOO_MANY_SKIPPED, "another process skipped too many bad rows")

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # no key/value cache: a training forward never reads one back (and a compiled layer would recompile on it)
        return self.model(**{k: v.to(self.accelerator.device) for k, v in batch.items()}, use_cache=False).loss

    # -- the run ---------------------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        """Run (or resume) the whole run; another trainer on the same `output_dir` is refused at once."""
        with training_lock(self.config.output_dir, self.accelerator):
            return self._run()

    def _run(self) -> TrainResult:
        config, accelerator = self.config, self.accelerator
        start = time.time()
        fits = functools.partial(ckpt.check_fits, deepspeed=self.deepspeed, output_dir=config.output_dir,
                                 trained_names=self.trained_names)
        checkpoint = ckpt.resume_point(config.output_dir, accelerator, config.keep_checkpoints,
                                       resume=config.resume, fits=fits)
        if checkpoint is not None:
            self.load_checkpoint(checkpoint)
            if accelerator.is_main_process:
                say_how_it_resumes(checkpoint, config)
        self.reporter = reporter = Reporter(config, accelerator, list(self.streams))
        reporter.start(self.step)
        self.model.train()
        bf16 = self.accelerator.mixed_precision == "bf16"
        frozen_dtype = torch.bfloat16 if config.frozen_linears_in_bf16 and bf16 else None
        with (frozen_linear_weights_in(self.unwrapped, frozen_dtype),
              compiled_decoder_layers(self.unwrapped, config.compile_layers), StopRequest() as stop):
            self._train_loop(config, reporter, stop)
        if self.vision_cache is not None:
            log.info(self.vision_cache.summary())
        reporter.close()
        self.save_checkpoint()
        adapter_path = self.save_adapter(Path(config.output_dir) / "adapter.safetensors")
        reporter.finish(self.history)
        return TrainResult(self.step, self.history, self.skipped_steps, adapter_path, time.time() - start)

    def _train_loop(self, config: TrainConfig, reporter: Reporter, stop: StopRequest) -> None:
        accelerator = self.accelerator
        while self.step < config.max_steps:
            stream = self.stream_for(self.step)
            tick = time.time()
            metrics = self._train_step(stream)
            seconds = time.time() - tick
            self.history.append({"step": self.step, "stream": stream.name, "loss": metrics["loss"], "lr": metrics["lr"],
                                 "skipped": metrics["skipped"], "tokens": metrics["tokens"],
                                 "pad_share": round(metrics["pad_share"], 4), "seconds": round(seconds, 4)})
            self.step += 1
            reporter.step(self.step, stream.name, metrics, seconds)
            if self.callbacks and accelerator.is_main_process:
                self._run_callbacks()
            if self.nonfinite_in_row >= config.max_nonfinite_steps:
                path = self.save_checkpoint()
                raise TrainingStopped(
                    f"{self.nonfinite_in_row} steps in a row had a non-finite loss (last at step {self.step}); "
                    f"stopped with a checkpoint at '{path}'"
                )
            signal_name = stop.requested(accelerator)
            if signal_name:
                reporter.close()
                path = self.save_checkpoint()
                raise TrainingStopped(f"stopped by {signal_name} after step {self.step} with a checkpoint at '{path}'; "
                                      f"run the same command again to resume from it")
            if config.checkpoint_every and self.step % config.checkpoint_every == 0 and self.step < config.max_steps:
                self.save_checkpoint()

    def log(self, values: dict[str, float], step: int) -> None:
        """Scalars to the run's trackers (`report_to`, TensorBoard by default) at `step`, beside the losses; a
        callback's figures, say. Nothing without `report_to`, or outside `train()`."""
        reporter = getattr(self, "reporter", None)
        if reporter is not None:
            reporter.log(values, step)

    def _run_callbacks(self) -> None:
        """Each callback gets the trainer after `self.step` optimizer steps (on the main process; the others wait
        for it in the next step's collectives). What it does to the random generators or to the model's train/eval
        mode is undone, so a run with callbacks trains exactly like one without."""
        rng_tensors, rng_python = ckpt.rng_state()
        try:
            with eagerly(self.config.compile_layers):
                for callback in self.callbacks:
                    callback(self, self.step)
        finally:
            ckpt.set_rng_state(rng_tensors, rng_python)
            self.model.train()

    # -- files -----------------------------------------------------------------------------------------------------
    def full_tensors(self) -> dict[str, torch.Tensor]:
        """Every trained tensor in full (all processes must call this; each gets the full tensors)."""
        return self.backend.full_tensors(self.trained_names)

    def training_facts(self) -> dict:
        """What the adapter file and its model card record of the run: steps done, and each stream's data."""
        def described(dataset) -> dict:
            file = getattr(dataset, "source_file", None)
            return {"rows": len(dataset), **({"file": str(file)} if file else {})}

        return {"steps": self.step, "data": {name: described(s.dataset) for name, s in self.streams.items()}}

    def save_adapter(self, path: Path) -> Path:
        """The trained adapter, with the run's facts in its metadata and a model card (README.md) beside it."""
        tensors = self.full_tensors()
        if self.accelerator.is_main_process:
            path = write_adapter(path, tensors, {**self.metadata, "training": json.dumps(self.training_facts())})
            write_model_card(path)
        self.accelerator.wait_for_everyone()
        return Path(path)

    def save_checkpoint(self) -> Path:
        state = {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "nonfinite_in_row": self.nonfinite_in_row,
            "streams": {name: stream.cursor() for name, stream in self.streams.items()},
            "history": self.history,
            "max_steps": self.config.max_steps,  # what a rerun with another max_steps is told it continues
        }
        return ckpt.save(self.config.output_dir, self.step, self.backend, self.full_tensors(), self.metadata, state,
                         keep=self.config.keep_checkpoints)

    def load_checkpoint(self, checkpoint: Path | ckpt.Checkpoint) -> None:
        """Continue from a checkpoint (a folder, or as `ckpt.read` returned it); every process must call this."""
        if not isinstance(checkpoint, ckpt.Checkpoint):
            checkpoint = ckpt.read(checkpoint, self.accelerator.process_index)
        state = ckpt.load(checkpoint, self.backend, self.config.output_dir, self.trained_names)
        for name, cursor in state["streams"].items():
            self.streams[name].restore(cursor)
        self.step, self.skipped_steps = state["step"], state["skipped_steps"]
        self.nonfinite_in_row, self.history = state["nonfinite_in_row"], state["history"]
