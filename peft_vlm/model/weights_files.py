"""Only safetensors weights are read from a path a user or an adapter file names: open_clip, timm and transformers
read any other weights file with `torch.load` (pickle, which can run code).

A folder may hold pickled weights beside safetensors ones (hub snapshots do), so the rule is the file its loader
reads: transformers loads run with `use_safetensors=True` (`model.safetensors` or its index), open_clip's
`local-dir:` folders must hold `open_clip_model.safetensors` (open_clip prefers `open_clip_pytorch_model.bin` to any
other safetensors file), and `hf-hub:` repositories must hold it too. Checked before anything is loaded.
"""
from __future__ import annotations

import os

from peft_vlm.errors import ModelLoadError

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
SCHEMAS = ("transformers:", "timm:", "local-dir:")
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors")
TRANSFORMERS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
OPEN_CLIP_HUB = "hf-hub:"


# the safetensors files the loader of each schema reads from a folder
READ_FROM_FOLDER = {"local-dir:": OPEN_CLIP_WEIGHTS, "timm:": TRANSFORMERS_WEIGHTS,
                    "transformers:": TRANSFORMERS_WEIGHTS, "": TRANSFORMERS_WEIGHTS + OPEN_CLIP_WEIGHTS}


def _pickled(value: str) -> bool:
    schema = next((s for s in SCHEMAS if value.startswith(s)), "")
    path = os.path.expanduser(value[len(schema):])
    if path.lower().endswith(PICKLE_SUFFIXES):
        return True
    if os.path.isfile(path):
        return not path.endswith(".safetensors")
    if os.path.isdir(path):
        names = set(os.listdir(path))
        has_pickle = any(name.lower().endswith(PICKLE_SUFFIXES) for name in names)
        return has_pickle and not names & set(READ_FROM_FOLDER[schema])
    return False


def refuse_pickle_weights(value, where: str) -> None:
    """Refuse a model description (any nesting of mappings and lists) that names a weights file other than
    safetensors, or a folder (plain, `transformers:`, open_clip `local-dir:`) whose loader would read pickled
    weights from it; a decoy `*.safetensors` of another name beside them does not count."""
    if isinstance(value, dict):
        for item in value.values():
            refuse_pickle_weights(item, where)
    elif isinstance(value, (list, tuple)):
        for item in value:
            refuse_pickle_weights(item, where)
    elif isinstance(value, str) and value and _pickled(value):
        raise ModelLoadError(f"{where}: '{value}' is not safetensors weights (or holds pickled weights its loader "
                             f"would read); weights are read with safetensors only (no pickle)")


def require_hub_safetensors(name: str) -> None:
    """An open_clip `hf-hub:ORG/REPO` name: fetch its safetensors weights first (open_clip then finds them in the
    cache), so that a repository that has only pickled weights is refused rather than unpickled."""
    if not name.startswith(OPEN_CLIP_HUB):
        return
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        hf_hub_download(name[len(OPEN_CLIP_HUB):], OPEN_CLIP_WEIGHTS[0])
    except (OSError, ValueError, EntryNotFoundError) as error:
        raise ModelLoadError(f"vision tower '{name}': no {OPEN_CLIP_WEIGHTS[0]} could be read from it "
                             f"({type(error).__name__}); weights are read with safetensors only (no pickle)") from None
