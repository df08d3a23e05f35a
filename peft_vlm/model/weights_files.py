"""Only safetensors weights are read from a path a user or an adapter file names: open_clip, timm and transformers
read any other weights file with `torch.load` (pickle, which can run code).

A folder may hold pickled weights beside safetensors ones (hub snapshots do), so the rule is the file its loader
reads: transformers loads run with `use_safetensors=True` (`model.safetensors` or its index), open_clip's
`local-dir:` folders must hold `open_clip_model.safetensors` (open_clip prefers `open_clip_pytorch_model.bin` to any
other safetensors file), and the hub weights of `hf-hub:` names and pretrained tags are fetched as safetensors first
(open_clip looks for those before it falls back to pickled ones). Checked before anything is loaded.
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


def require_open_clip_safetensors(name: str, pretrained: str | None) -> None:
    """Before open_clip builds tower `name` with weights `pretrained` (a tag or a file): the weights it would read
    are safetensors, or a ModelLoadError names them."""
    if name.startswith(OPEN_CLIP_HUB):
        return _fetch(name[len(OPEN_CLIP_HUB):], OPEN_CLIP_WEIGHTS[0], f"vision tower '{name}'")
    if not pretrained:
        return
    import open_clip

    where = f"vision tower '{name}' (pretrained={pretrained!r})"
    tag = open_clip.get_pretrained_cfg(name.replace("/", "-"), pretrained)  # open_clip looks for a tag first
    if not tag:
        return refuse_pickle_weights(pretrained, where)
    if not tag.get("hf_hub"):
        raise ModelLoadError(f"{where}: its weights come only as a pickled download; weights are read with "
                             "safetensors only (no pickle)")
    repo, file = os.path.split(tag["hf_hub"])
    _fetch(repo, _safetensors_twin(file), where)


def timm_safetensors_weights(name: str) -> str:
    """The local safetensors file to build timm tower `name` (a timm name or `hf-hub:REPO`) with pretrained weights
    from, fetched from the hub into its cache; a ModelLoadError where timm would read pickled weights (a download
    URL, a hub file of another kind). timm itself falls back to `pytorch_model.bin` when a repository has no
    safetensors file, so the tower is built from this file (timm's `pretrained_cfg` `file`), never from timm's
    own search."""
    where = f"vision tower 'timm:{name}' (pretrained)"
    if name.startswith(OPEN_CLIP_HUB):
        return _fetch(name[len(OPEN_CLIP_HUB):], "model.safetensors", where)
    import timm

    config = timm.models.get_pretrained_cfg(name)
    if config is None or not config.hf_hub_id:
        raise ModelLoadError(f"{where}: timm has no hub weights for it (only a pickled download, or none); weights "
                             "are read with safetensors only (no pickle)")
    return _fetch(config.hf_hub_id, _safetensors_twin(config.hf_hub_filename or "model.safetensors"), where)


def _safetensors_twin(file: str) -> str:
    """The safetensors file a hub loader reads in place of `file` (open_clip's and timm's own order)."""
    if file.endswith(".safetensors"):
        return file
    stem = os.path.splitext(file)[0]
    return OPEN_CLIP_WEIGHTS[0] if stem in ("", "open_clip_pytorch_model") else stem + ".safetensors"


def _fetch(repo: str, file: str, where: str) -> str:
    """Download `file` of hub repository `repo` into the cache (where its loader finds it) and give its local path,
    or refuse naming it."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return hf_hub_download(repo, file)
    except (OSError, ValueError, EntryNotFoundError) as error:
        raise ModelLoadError(f"{where}: no {file} could be read from '{repo}' ({type(error).__name__}); weights are "
                             "read with safetensors only (no pickle)") from None
