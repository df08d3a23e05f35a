"""DeepSpeed ZeRO (through accelerate) for `JointTrainer`: `DeepSpeedBackend` and what it needs.

`accelerate launch` with a DeepSpeed config (recipes/accelerate/deepspeed_zero*.yaml) sets `ACCELERATE_USE_DEEPSPEED`;
the trainer then hands accelerate one `StreamAdamW` whose param groups are tagged with their data stream, and the
DeepSpeed engine steps it. `deepspeed` itself is imported only in such a run.

- DeepSpeed's ZeRO optimizers keep the client optimizer's group dicts and call its `step()` with `param_groups`
  narrowed to one group (stages 1 and 2) or with every other group's `params` emptied (stage 3); `StreamAdamW.step`
  skips the groups of the streams not being trained, so their fp32 masters, moments and step counts stay as they are,
  and the parameters copied back from those masters are unchanged.
- The parameters of the streams not being trained get no gradient (`requires_grad` is off for the step), so
  DeepSpeed's gradient clipping measures the trained groups only, as in a run without DeepSpeed.
- The recipe's `batch_size`, `gradient_accumulation_steps` and `max_grad_norm` fill the DeepSpeed config's "auto"
  values; a value set in both that differs is refused.
- Under ZeRO-3 each process holds a slice of every parameter: `gathered` makes them whole for writing adapters.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterable

import torch

from peft_vlm.errors import ConfigError
from peft_vlm.training.backend import Backend, GroupMaker

RECIPE_KEYS = {  # DeepSpeed config key -> TrainConfig field
    "train_micro_batch_size_per_gpu": "batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "gradient_clipping": "max_grad_norm",
}


def requested() -> bool:
    """True when launched with a DeepSpeed config (`accelerate launch`, or ACCELERATE_USE_DEEPSPEED=true)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def accelerator_options(config) -> dict:
    """Arguments for `Accelerator`: accelerate runs DeepSpeed only with `cpu=False`. Without a GPU, DeepSpeed picks
    its CPU accelerator, whose backend is gloo (ccl when oneccl_bindings_for_pytorch is installed); accelerate must be
    given that backend, or it counts one process only."""
    options = {"cpu": False, "gradient_accumulation_steps": config.gradient_accumulation_steps}
    if torch.cuda.is_available():
        return options
    from accelerate.utils import InitProcessGroupKwargs
    from deepspeed.accelerator import get_accelerator

    return {**options,
            "kwargs_handlers": [InitProcessGroupKwargs(backend=get_accelerator().communication_backend_name())]}


class StreamAdamW(torch.optim.AdamW):
    """AdamW whose param groups each belong to one data stream (`group["stream"]`): `step()` updates the groups of
    the streams in `active` only, so a step on one stream moves nothing of another, not by momentum nor by decay."""

    def __init__(self, param_groups: list[dict], **kwargs):
        super().__init__(param_groups, **kwargs)
        self.active: tuple[str, ...] = ()

    def step(self, closure=None):
        every = self.param_groups
        self.param_groups = [group for group in every if group["stream"] in self.active]
        try:
            return super().step(closure)
        finally:
            self.param_groups = every


def prepare(accelerator, model: torch.nn.Module, optimizer: StreamAdamW, config) -> torch.nn.Module:
    """The DeepSpeed engine for `model` with `optimizer`, the DeepSpeed config's "auto" values taken from `config`."""
    recipe = {
        "train_micro_batch_size_per_gpu": config.batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "gradient_clipping": float(config.max_grad_norm or 0.0),
    }
    if config.sharding != "ddp":
        raise ConfigError(f"TrainConfig.sharding={config.sharding!r} does not apply under DeepSpeed (its ZeRO stage "
                          "shards); leave it at 'ddp' or launch without the DeepSpeed config")
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    wrong = [key for key, value in recipe.items() if ds_config.get(key, "auto") not in ("auto", value)]
    if wrong:
        raise ConfigError(
            "the DeepSpeed config disagrees with the training recipe: "
            + ", ".join(f"{key}={ds_config[key]!r} vs TrainConfig.{RECIPE_KEYS[key]}={recipe[key]!r}" for key in wrong)
            + "; leave these keys out of the DeepSpeed/accelerate config (or set them to 'auto'): the recipe sets them"
        )
    ds_config.update(recipe)  # accelerate fills train_batch_size ("auto") from these and the process count
    engine, _ = accelerator.prepare(model, optimizer)
    return engine


def gathered(parameters: Iterable[torch.nn.Parameter]):
    """Context in which ZeRO-3 partitioned parameters are whole (every process must enter it); a no-op otherwise."""
    partitioned = [p for p in parameters if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned)


def save_state(engine, folder) -> None:
    """The engine's partitioned optimizer state and trained parameters (not the frozen base), every process its part."""
    engine.save_checkpoint(str(folder), tag="state", save_latest=False, exclude_frozen_parameters=True)


def load_state(engine, folder) -> None:
    path, _ = engine.load_checkpoint(str(folder), tag="state", load_module_strict=False, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise ConfigError(f"no DeepSpeed state in checkpoint folder '{folder}'")


class DeepSpeedBackend(Backend):
    """The engine owns one `StreamAdamW` and steps it inside the last micro-batch's backward."""

    deepspeed = True

    def accelerator_options(self) -> dict:
        return accelerator_options(self.config)

    def prepare(self, model: torch.nn.Module, make_groups: GroupMaker) -> torch.nn.Module:
        # one optimizer for the engine, created before ZeRO partitions the parameters
        by_stream = make_groups(dict(model.named_parameters()))
        self.optimizer = StreamAdamW([group for groups in by_stream.values() for group in groups],
                                     betas=self.config.betas)
        return self._prepared(prepare(self.accelerator, model, self.optimizer, self.config), by_stream)

    def param_groups(self, stream: str) -> list[dict]:
        return [group for group in self.optimizer.param_groups if group["stream"] == stream]

    @contextlib.contextmanager
    def training(self, stream: str):
        """The other streams' parameters get no gradient in this step, so that the engine's gradient clipping
        measures this stream's gradients only (as `AccelerateBackend.step` clips them alone)."""
        others = [p for name, ps in self.stream_parameters.items() if name != stream for p in ps]
        for parameter in others:
            parameter.requires_grad_(False)
        try:
            yield
        finally:
            for parameter in others:
                parameter.requires_grad_(True)

    def sync(self, last: bool):
        return self.accelerator.accumulate(self.model)  # the engine reduces and steps at the end of accumulation

    def empty_loss(self, parameters, stand_in):
        """Every process runs the model in every micro-batch (the engine reduces gradients in the order they come,
        and ZeRO-3 parameters exist whole only inside the forward): another slot's batch, weighted 0."""
        return stand_in() * 0

    def backward(self, loss, micro_batches, update=None):
        if update is not None:  # known before the last backward, inside which the engine steps
            self.optimizer.active = update
        self.accelerator.backward(loss)  # DeepSpeed divides by its gradient_accumulation_steps itself

    def step(self) -> None:
        """The engine stepped (and dropped the gradients) inside the last backward."""

    def gathered(self, parameters):
        return gathered(parameters)

    def save_state(self, folder) -> None:
        save_state(self.model, Path(folder) / "deepspeed")

    def load_state(self, folder, tensors, optimizer_states) -> None:
        """The engine's checkpoint holds the trained parameters and the partitioned optimizer state."""
        load_state(self.model, Path(folder) / "deepspeed")
