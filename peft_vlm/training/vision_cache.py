"""Whether a training run caches its frozen vision tower's features (`TrainConfig.cache_vision_features`).

None decides by the run: on when the tower is frozen and deterministic and some stream's data repeats (the run takes
more rows from it than it holds: a second epoch sees every image again), off otherwise, the reason logged. True asks
for it and refuses a tower that trains or draws random numbers, naming what; False leaves it off. Sharded runs
(FSDP2, DeepSpeed) do not cache: a process that skipped the tower on a hit while another ran it on a miss would leave
the collectives that gather the tower's weights unmatched.
"""
from __future__ import annotations

import logging

from torch import nn

from peft_vlm.errors import ConfigError
from peft_vlm.model import vision_feature_cache as features
from peft_vlm.training.config import TrainConfig
from peft_vlm.training.streams import DataStream, stream_for

log = logging.getLogger(__name__)


def epochs_by_stream(streams: dict[str, DataStream], config: TrainConfig, processes: int) -> dict[str, float]:
    """How many passes over its data each stream makes in `max_steps` steps."""
    steps = dict.fromkeys(streams, 0)
    for step in range(config.max_steps):
        steps[stream_for(streams, config.caption_ratio, step).name] += 1
    rows = config.batch_size * config.gradient_accumulation_steps * processes
    return {name: steps[name] * rows / max(1, len(stream.dataset)) for name, stream in streams.items()}


def cache_for_run(model: nn.Module, config: TrainConfig, streams: dict[str, DataStream], processes: int,
                  sharded: bool) -> features.VisionFeatureCache | None:
    """The cache the run uses, attached to `model` (None: the tower runs on every image)."""
    setting = config.cache_vision_features
    if setting is False or not hasattr(model, "vision_feature_cache"):
        if setting is True:
            raise ConfigError("TrainConfig: cache_vision_features=True serves the vision tower of a "
                              f"pv.VisionLanguageModel; {type(model).__name__} runs its own")
        if hasattr(model, "vision_feature_cache"):
            model.vision_feature_cache = None
        return None
    tower = model.vision_tower
    if setting is True:
        if sharded:
            raise ConfigError("TrainConfig: cache_vision_features=True is for single-process and DDP runs; with "
                              "sharded weights (FSDP2, DeepSpeed) every process must run the tower")
        features.check_cacheable(tower)
        reason = None
    else:
        reason = _reason_against(tower, config, streams, processes, sharded)
    if reason:
        log.info("vision feature cache off: %s", reason)
        return None
    cache = model.vision_feature_cache or features.VisionFeatureCache(features.default_folder())
    model.vision_feature_cache = cache
    log.info("vision feature cache on: frozen vision tower's features stored under %s", cache.folder or "memory")
    return cache


def _reason_against(tower: nn.Module, config: TrainConfig, streams: dict[str, DataStream], processes: int,
                    sharded: bool) -> str | None:
    if sharded:
        return "the run shards its weights (FSDP2 or DeepSpeed)"
    trainable = features.trainable_parameters(tower)
    if trainable:
        return f"the vision tower trains ({len(trainable)} parameters, e.g. {trainable[0]})"
    stochastic = features.stochastic_modules(tower)
    if stochastic:
        return f"the vision tower draws random numbers in training mode ({', '.join(stochastic[:3])})"
    epochs = epochs_by_stream(streams, config, processes)
    if max(epochs.values()) <= 1:
        shown = ", ".join(f"{name} {value:.2f}" for name, value in epochs.items())
        return f"no image is seen twice by epochs (epochs per stream: {shown}); set it True to cache anyway"
    return None
