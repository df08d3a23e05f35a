"""A frozen vision tower's patch tokens, computed once per image and reused (`train.cache_vision_features`).

A frozen tower gives the same patch tokens for the same input every time, so a run that sees an image again (a
second epoch, or the describe pass and then the answer pass of a describe-then-answer evaluation) can read them
instead of running the tower. An entry is used only when all three parts of its key match:

- the image: a SHA-256 of the pixel tensor the tower gets (shape, dtype, bytes), after decoding, resizing and
  normalisation;
- the tower: its description, a SHA-256 of every weight and buffer (whole tensors, not a sample: a cache must not
  trust a sample), their dtypes, the device type and the autocast the call runs under;
- the preprocessing: the model's resize mode, the tower's input size, its normalisation and interpolation.

Entries live in memory (the least recently used dropped beyond `memory_bytes`) and, with a folder, as one
safetensors file per image under `<folder>/<tower key>/`. A file is written under a temporary name and renamed, so a
killed writer leaves nothing that passes for an entry, and a file whose recorded keys differ from the lookup's is not
used. The weights are hashed again whenever a cheap check of them (each tensor's identity, storage, version counter
and a few of its values) changes: `load_state_dict`, a swap to bf16 copies, a merge.

The tower runs instead whenever a cached answer could differ from its own: while the tower has a trainable parameter
(gradients must reach it; vision LoRA, `train_vision_tower`), and while it is in training mode with a stochastic
module in it (dropout, patch dropout, drop path), the reason logged once.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter, OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from peft_vlm.errors import ConfigError
from peft_vlm.runtime.cache_root import cache_root
from peft_vlm.runtime.file_modes import like_other_outputs

log = logging.getLogger(__name__)

FORMAT = "peft_vlm.vision_features/1"
FOLDER_NAME = "vision_features"
MEMORY_BYTES = 1 << 30
SAMPLES_PER_TENSOR = 8  # values read per tensor by the cheap check that decides when to hash the weights again
# attributes through which towers' modules (torch, open_clip, timm, transformers) hold a drop probability
DROP_ATTRIBUTES = ("p", "prob", "drop_prob", "dropout", "dropout_p", "attention_dropout")


def default_folder() -> Path:
    """Where entries are stored unless told otherwise: `<cache root>/vision_features`."""
    return cache_root() / FOLDER_NAME


def trainable_parameters(tower: nn.Module) -> list[str]:
    return [name for name, parameter in tower.named_parameters() if parameter.requires_grad]


def stochastic_modules(tower: nn.Module) -> list[str]:
    """The tower's modules that draw random numbers in training mode: "name (attribute=value)" each."""
    found = []
    for name, module in tower.named_modules():
        for attribute in DROP_ATTRIBUTES:
            value = getattr(module, attribute, None)
            if isinstance(value, float) and value > 0:
                found.append(f"{name or type(module).__name__} ({attribute}={value})")
                break
    return found


def check_cacheable(tower: nn.Module) -> None:
    """A ConfigError naming what makes the tower's output change between calls (trainable parameters, stochastic
    modules), for a run that asks for the cache."""
    trainable = trainable_parameters(tower)
    if trainable:
        shown = ", ".join(trainable[:5]) + (f" and {len(trainable) - 5} more" if len(trainable) > 5 else "")
        raise ConfigError(f"TrainConfig: cache_vision_features=True needs a frozen vision tower, but it trains "
                          f"{len(trainable)} parameter(s): {shown}")
    stochastic = stochastic_modules(tower)
    if stochastic:
        raise ConfigError("TrainConfig: cache_vision_features=True needs a deterministic vision tower, but in "
                          f"training mode it draws random numbers in {', '.join(stochastic[:5])}")


def preprocessing_of(tower: nn.Module, resize: str) -> dict:
    """The preprocessing part of the key: what makes an image into the tower's input."""
    config = dict(getattr(tower, "preprocess_cfg", None) or {})
    return {"resize": resize, "image_size": list(getattr(tower, "image_size", ()) or ()),
            **{key: config[key] for key in ("mean", "std", "interpolation") if key in config}}


def _plain(tensor: torch.Tensor) -> bool:
    return type(tensor) in (torch.Tensor, nn.Parameter) and not tensor.is_meta


def _tensors(tower: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*tower.named_parameters(), *tower.named_buffers()]


def _quick_state(tensors: list[tuple[str, torch.Tensor]]) -> tuple:
    """Cheap to take every call, and different after any usual change to the weights."""
    samples = []
    for _, tensor in tensors:
        flat = tensor.detach().reshape(-1)
        samples.append(flat[:: max(1, flat.numel() // SAMPLES_PER_TENSOR)][:SAMPLES_PER_TENSOR].float().cpu())
    values = torch.cat(samples).numpy().tobytes() if samples else b""
    return (tuple((name, id(t), t.data_ptr(), t._version, t.dtype, tuple(t.shape)) for name, t in tensors),
            hashlib.sha256(values).hexdigest())


def weights_digest(tensors: list[tuple[str, torch.Tensor]]) -> str:
    """A SHA-256 of every byte of every tensor, with its name, dtype and shape."""
    digest = hashlib.sha256()
    for name, tensor in tensors:
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def image_digest(pixels: torch.Tensor) -> str:
    digest = hashlib.sha256(f"{pixels.dtype}:{tuple(pixels.shape)};".encode())
    digest.update(pixels.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _autocast_of(device_type: str) -> str | None:
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return str(torch.get_autocast_dtype(device_type))
    return None


class VisionFeatureCache:
    """Patch tokens by (tower key, image key), in memory and, with `folder`, on disk. Attach it to a model as
    `model.vision_feature_cache` (`attached`); the model's `encode_images` then asks it before running the tower."""

    def __init__(self, folder: str | os.PathLike | None = None, memory_bytes: int = MEMORY_BYTES):
        self.folder = Path(folder).expanduser() if folder is not None else None
        self.memory_bytes = memory_bytes
        self._memory: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self._memory_used = 0
        self._weights: dict[int, tuple[tuple, str]] = {}  # id(tower) -> (quick state, weights digest)
        self._told: set[str] = set()
        self.stats: Counter = Counter()  # memory_hits, disk_hits, misses, written, bypassed

    # -- keys ------------------------------------------------------------------------------------------------------
    def tower_key(self, tower: nn.Module, preprocessing: dict) -> str | None:
        """The tower and preprocessing part of the key (None: the tower's weights cannot be read, e.g. sharded)."""
        tensors = _tensors(tower)
        if not tensors or not all(_plain(t) for _, t in tensors):
            return None
        quick = _quick_state(tensors)
        known = self._weights.get(id(tower))
        if known is None or known[0] != quick:
            known = (quick, weights_digest(tensors))
            self._weights[id(tower)] = known
        device_type = tensors[0][1].device.type
        key = {"format": FORMAT, "tower": type(tower).__name__,
               "description": getattr(tower, "description", None), "weights": known[1],
               "device": device_type, "autocast": _autocast_of(device_type), "preprocessing": preprocessing}
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()

    def _bypass_reason(self, tower: nn.Module) -> str | None:
        trainable = trainable_parameters(tower)
        if trainable:
            return f"the vision tower has trainable parameters ({trainable[0]}, ...)"
        if tower.training:
            stochastic = stochastic_modules(tower)
            if stochastic:
                return f"the vision tower is in training mode with stochastic modules: {', '.join(stochastic[:3])}"
        return None

    def _tell_once(self, reason: str) -> None:
        if reason not in self._told:
            self._told.add(reason)
            log.warning("vision feature cache not used: %s; the tower runs on every image", reason)

    # -- lookup ----------------------------------------------------------------------------------------------------
    def patches(self, tower: nn.Module, pixel_values: torch.Tensor, preprocessing: dict,
                compute: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """`compute(pixel_values)` (the tower by default), each image read from the cache where it holds it."""
        compute = compute or tower
        reason = self._bypass_reason(tower)
        tower_key = None if reason else self.tower_key(tower, preprocessing)
        if tower_key is None:
            self._tell_once(reason or "the vision tower's weights are not plain tensors (sharded or on meta)")
            self.stats["bypassed"] += len(pixel_values)
            return compute(pixel_values)
        keys = [image_digest(image) for image in pixel_values]
        found = [self._read(tower_key, key) for key in keys]
        missing = [index for index, entry in enumerate(found) if entry is None]
        self.stats["misses"] += len(missing)
        if missing:
            computed = compute(pixel_values[missing] if len(missing) < len(keys) else pixel_values)
            for index, features in zip(missing, computed):
                found[index] = features
                self._write(tower_key, keys[index], features)
        device = found[missing[0]].device if missing else pixel_values.device
        return torch.stack([entry.to(device) for entry in found])

    def _path(self, tower_key: str, image_key: str) -> Path | None:
        if self.folder is None:
            return None
        return self.folder / tower_key[:32] / image_key[:2] / f"{image_key}.safetensors"

    def _read(self, tower_key: str, image_key: str) -> torch.Tensor | None:
        entry = self._memory.get((tower_key, image_key))
        if entry is not None:
            self._memory.move_to_end((tower_key, image_key))
            self.stats["memory_hits"] += 1
            return entry
        path = self._path(tower_key, image_key)
        if path is None or not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as file:
                metadata = file.metadata() or {}
                if metadata.get("tower") != tower_key or metadata.get("image") != image_key:
                    return None  # another key under a colliding name prefix: not this entry
                entry = file.get_tensor("patches")
        except (OSError, ValueError, RuntimeError, SafetensorError):  # a damaged file is no entry; it is written again
            return None
        self.stats["disk_hits"] += 1
        self._remember(tower_key, image_key, entry)
        return entry

    def _write(self, tower_key: str, image_key: str, features: torch.Tensor) -> None:
        features = features.detach().to("cpu").contiguous()
        self._remember(tower_key, image_key, features)
        path = self._path(tower_key, image_key)
        if path is None:
            return
        temporary = path.with_name(f"{path.name}.partial-{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"patches": features}, str(temporary),
                      metadata={"format": FORMAT, "tower": tower_key, "image": image_key})
            like_other_outputs(temporary)
            os.replace(temporary, path)
            self.stats["written"] += 1
        except OSError as error:  # a full or read-only disk costs the saving, not the run
            temporary.unlink(missing_ok=True)
            self._tell_once(f"cannot write under '{self.folder}' ({error.strerror or error}); entries stay in memory")

    def _remember(self, tower_key: str, image_key: str, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        if size > self.memory_bytes:
            return
        self._memory[(tower_key, image_key)] = features
        self._memory_used += size
        while self._memory_used > self.memory_bytes:
            _, dropped = self._memory.popitem(last=False)
            self._memory_used -= dropped.numel() * dropped.element_size()

    def summary(self) -> str:
        """One line: where entries are kept and how the lookups went."""
        stats = self.stats
        where = f"'{self.folder}'" if self.folder else "memory only"
        return (f"vision feature cache ({where}): {stats['memory_hits']} memory hits, {stats['disk_hits']} disk hits, "
                f"{stats['misses']} misses, {stats['written']} files written, {stats['bypassed']} images bypassed")


def cache_of(model: nn.Module) -> VisionFeatureCache | None:
    return getattr(model, "vision_feature_cache", None)


@contextmanager
def attached(model: nn.Module, cache: VisionFeatureCache | None):
    """`model.vision_feature_cache` set to `cache` (None: no cache) within the block, put back after it."""
    if not hasattr(model, "vision_feature_cache"):  # a model whose tower this cache does not serve
        yield None
        return
    before = model.vision_feature_cache
    model.vision_feature_cache = cache
    try:
        yield cache
    finally:
        model.vision_feature_cache = before


def for_evaluation(model: nn.Module, setting: bool | None, images_repeat: bool):
    """The cache an evaluation uses (`attached`): the model's own where it has one (a training run attached it);
    else with True one in the default folder, with None one in memory for the evaluation when its images repeat
    (describe, then answer); with False none."""
    own = cache_of(model)
    if setting is False:
        return attached(model, None)
    if own is not None:
        return attached(model, own)
    tower = getattr(model, "vision_tower", None)
    if setting is None and (not images_repeat or tower is None or trainable_parameters(tower)):
        return attached(model, None)
    return attached(model, VisionFeatureCache(default_folder() if setting else None))
