"""Adapter files: one `.safetensors` file with only what the methods added or unfroze.

The file's metadata holds the method configs (JSON), the package version and a fingerprint of the base model, so
that `load_adapter` can rebuild the methods on a fresh base and refuse a base the adapter was not trained on.
No pickle anywhere: tensors are safetensors, everything else is JSON.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from peft_vlm.data.answer_protocol import AnswerProtocol
from peft_vlm.version import __version__
from peft_vlm.errors import AdapterFileError, AdapterMismatchError, ConfigError, UnknownMethodError
from peft_vlm.methods.apply import apply, is_merged, rollback_on_error
from peft_vlm.methods.registry import config_from_entry
from peft_vlm.runtime.attention import kernel_under
from peft_vlm.runtime.file_modes import like_other_outputs
from peft_vlm.runtime.lm_layers import is_vision_language_model, language_model_of
from peft_vlm.runtime.tracking import named_tracked_parameters, state_of

FORMAT = "peft_vlm.adapter/1"
ADAPTER_FILE_NAME = "adapter.safetensors"
CONFIG_KEYS = (
    "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "vocab_size", "head_dim",
)
SAMPLES_PER_TENSOR = 4096


def _adapter_path(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    return path if path.suffix == ".safetensors" else path / ADAPTER_FILE_NAME


def _weights_digest(tensors: list[tuple[str, torch.Tensor]]) -> str | None:
    """A digest of evenly spaced values of each tensor: cheap for 7B models, different for different weights."""
    digest = hashlib.sha256()
    for name, tensor in tensors:
        if tensor.is_meta:
            return None
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // SAMPLES_PER_TENSOR)
        digest.update(name.encode())
        digest.update(flat[::step].to("cpu", torch.float32).numpy().tobytes())
    return digest.hexdigest()[:32]


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """What identifies the base: the language model's shape, the vision tower, and a digest of frozen weights that
    no method wraps or quantizes (token embeddings, output head, vision tower), so a 4-bit and a full-precision copy
    of one model match."""
    language_model = language_model_of(model)
    config = language_model.config
    result: dict[str, Any] = {
        key: getattr(config, key) for key in CONFIG_KEYS if getattr(config, key, None) is not None
    }
    tracked = {id(p) for p, _, _ in named_tracked_parameters(model).values()}
    tensors = [("embed_tokens", language_model.get_input_embeddings().weight)]
    output = language_model.get_output_embeddings()
    if output is not None and output.weight is not tensors[0][1]:
        tensors.append(("lm_head", output.weight))
    if is_vision_language_model(model):
        result["vision"] = json.dumps(model.vision_tower.description, sort_keys=True)
        result["connector"] = model.connector_name
        # the tower's own weights under their own names (LoRA in the tower wraps them as `...base_layer.weight`)
        tower = [(n.replace(".base_layer.", "."), p) for n, p in model.vision_tower.named_parameters()
                 if id(p) not in tracked]
        tensors += sorted(tower, key=lambda named: named[0])
    result["weights"] = _weights_digest(tensors)
    return result


def _describe_difference(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    differences = []
    for key in sorted(set(saved) | set(current)):
        if key == "weights":
            continue
        if saved.get(key) != current.get(key):
            differences.append(f"{key}: adapter has {saved.get(key)!r}, model has {current.get(key)!r}")
    if (not differences and None not in (saved.get("weights"), current.get("weights"))
            and saved["weights"] != current["weights"]):
        differences.append("weights: same architecture but different weights (embeddings or vision tower differ)")
    return differences


def adapter_metadata(model: nn.Module) -> dict[str, str]:
    """The file metadata for `model`'s methods: configs, parameter owners, package version, base fingerprint."""
    state = state_of(model, create=False)
    if state is None or not state.applied:
        raise AdapterFileError("save_adapter: the model has no methods applied (use pv.apply first)")
    merged = is_merged(model)
    if merged:
        raise AdapterFileError(
            f"save_adapter: method(s) {', '.join(merged)} are merged into the base weights, so the file would miss "
            f"their weights; call pv.unmerge(model) first (and pv.merge again after saving)"
        )
    groups = {name: f"{entry.name}/{group}" for name, (_, entry, group) in named_tracked_parameters(model).items()}
    methods = [{"method": entry.name, "config": entry.method.config_to_dict()} for entry in state.methods()]
    metadata = {
        "format": FORMAT,
        "peft_vlm_version": __version__,
        "methods": json.dumps(methods),
        "groups": json.dumps(groups),
        "base": json.dumps(fingerprint(model)),
    }
    if hasattr(model, "base_spec"):  # how to rebuild the base, for `peft-vlm generate ADAPTER`
        metadata["base_model"] = json.dumps(model.base_spec())
    protocol = getattr(model, "answer_protocol", None)
    if protocol is not None:  # how the model was trained to answer, for generate and eval after loading
        metadata["answer_protocol"] = json.dumps(protocol.to_dict())
    return metadata


def write_adapter(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write an adapter file atomically: a killed writer never leaves a half-written file under the real name."""
    target = _adapter_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(target.name + ".tmp")
    save_file(
        {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}, str(temporary), metadata=metadata
    )
    like_other_outputs(temporary)
    os.replace(temporary, target)
    return target


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the trained parameters, the method configs and the base's fingerprint, and a model card (README.md)
    beside them; returns the adapter file written.

    `path` is a folder (the file is `adapter.safetensors` inside) or a `.safetensors` file name.
    """
    from peft_vlm.methods.model_card import write_model_card  # it reads the file back through this module

    metadata = adapter_metadata(model)
    tensors = {name: parameter for name, (parameter, _, _) in named_tracked_parameters(model).items()}
    target = write_adapter(path, tensors, metadata)
    write_model_card(target)
    return target


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
JSON_SCALARS = (str, int, float, bool, type(None))


def _json_field(raw: dict[str, str], key: str, kind: type, target: Path, required: bool = True) -> Any:
    """Metadata field `key` decoded from JSON and checked to be a `kind` (list or dict)."""
    if key not in raw:
        if required:
            raise AdapterFileError(f"'{target}': metadata field '{key}' is missing")
        return None
    try:
        value = json.loads(raw[key])
    except json.JSONDecodeError as error:
        raise AdapterFileError(f"'{target}': metadata field '{key}' is not valid JSON ({error})") from None
    if not isinstance(value, kind):
        raise AdapterFileError(
            f"'{target}': metadata field '{key}' must be a JSON {'list' if kind is list else 'object'}, "
            f"got {value!r:.80}"
        )
    return value


def _check_metadata(raw: dict[str, str], tensors: set[str], target: Path) -> dict[str, Any]:
    """The file's metadata, every field checked against what `adapter_metadata` writes; an AdapterFileError names
    the first field that does not fit."""
    if raw.get("format") != FORMAT:
        raise AdapterFileError(f"'{target}' is not a peft_vlm adapter file (format {raw.get('format')!r})")
    if "peft_vlm_version" not in raw:
        raise AdapterFileError(f"'{target}': metadata field 'peft_vlm_version' is missing")
    methods = _json_field(raw, "methods", list, target)  # may be empty: a file of a trained connector alone
    for index, entry in enumerate(methods):
        fits = isinstance(entry, dict) and set(entry) == {"method", "config"}
        if not fits or not isinstance(entry["method"], str) or not isinstance(entry["config"], dict):
            raise AdapterFileError(f"'{target}': metadata field 'methods' entry #{index + 1} must be "
                                   f"{{\"method\": NAME, \"config\": {{...}}}}, got {entry!r:.80}")
    groups = _json_field(raw, "groups", dict, target)
    if not all(isinstance(owner, str) and "/" in owner for owner in groups.values()):
        raise AdapterFileError(f"'{target}': metadata field 'groups' must map each tensor to 'method/group'")
    if set(groups) != set(tensors):
        odd = sorted(set(groups) ^ set(tensors))[:3]
        raise AdapterFileError(f"'{target}': metadata field 'groups' does not name the file's tensors (e.g. {odd})")
    base = _json_field(raw, "base", dict, target)
    for key, value in base.items():
        expected = (str,) if key in ("model_type", "vision", "connector") else (str, type(None)) if key == "weights" \
            else (int,) if key in CONFIG_KEYS else JSON_SCALARS
        if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
            raise AdapterFileError(f"'{target}': metadata field 'base' has {key}={value!r:.80}, not a valid value")
    base_model = _json_field(raw, "base_model", dict, target, required=False)
    metadata = {**raw, "methods": methods, "groups": groups, "base": base}
    if base_model is not None:
        attention = base_model.get("attn_implementation")
        if isinstance(attention, str):  # files of 0.1.0 recorded the extensible twin's name ("peft_vlm_eager")
            base_model["attn_implementation"] = kernel_under(attention)
        metadata["base_model"] = base_model
    training = _json_field(raw, "training", dict, target, required=False)
    if training is not None:
        metadata["training"] = training
    protocol = _json_field(raw, "answer_protocol", dict, target, required=False)
    if protocol is not None:
        try:
            metadata["answer_protocol"] = AnswerProtocol.from_dict(protocol, f"'{target}': metadata field "
                                                                             "'answer_protocol'")
        except ConfigError as error:
            raise AdapterFileError(str(error)) from None
    return metadata


def _check_tensors(tensors: dict[str, torch.Tensor], target: Path) -> None:
    """Trained parameters are floating point and finite: anything else would be cast, or spread NaN, silently."""
    for name, tensor in tensors.items():
        if tensor.dtype not in FLOAT_DTYPES:
            raise AdapterFileError(f"'{target}': tensor '{name}' has dtype {str(tensor.dtype).replace('torch.', '')}; "
                                   f"adapter tensors are float16, bfloat16, float32 or float64")
        if not bool(torch.isfinite(tensor).all()):
            raise AdapterFileError(f"'{target}': tensor '{name}' holds NaN or infinite values")


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata with JSON fields decoded and checked, tensors checked) of an adapter file. The metadata is checked
    from the file's header first: a file that is no adapter is refused without reading its tensors."""
    target = _adapter_path(path)
    if not target.is_file():
        raise AdapterFileError(f"no adapter file at '{target}'")
    with _opened(target) as handle:
        metadata = _check_metadata(handle.metadata() or {}, set(handle.keys()), target)
        _method_configs(metadata, target)  # each method's options: names, types, the config's own checks
        try:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as error:  # safetensors raises its own error types for corrupt data
            raise AdapterFileError(f"'{target}' is not a readable safetensors file: {error}") from None
    _check_tensors(tensors, target)
    return metadata, tensors


@contextlib.contextmanager
def _opened(target: Path):
    """The safetensors file at `target`, open (its header read, no tensor yet)."""
    try:
        handle = safe_open(str(target), framework="pt")
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise AdapterFileError(f"'{target}' is not a readable safetensors file: {error}") from None
    with handle:
        yield handle


def _method_configs(metadata: dict[str, Any], target: Path) -> list[Any]:
    configs = []
    for index, entry in enumerate(metadata["methods"]):
        where = f"'{target}': metadata field 'methods' entry #{index + 1}"
        try:
            configs.append(config_from_entry({**entry["config"], "method": entry["method"]}, where))
        except ConfigError as error:
            raise AdapterFileError(str(error)) from None
        except UnknownMethodError as error:
            raise UnknownMethodError(f"{where}: {error}") from None
    return configs


def load_adapter(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Apply the file's methods to a fresh base and load its tensors; refuses a base the adapter does not fit.

    The file is read and checked before the model is touched; a refusal after that (a base, tensor name or shape
    that does not fit) takes the methods off again, so the model is left as it was and a retry can succeed."""
    target = _adapter_path(path)
    metadata, tensors = read_adapter(target)
    configs = _method_configs(metadata, target)
    with rollback_on_error(model):
        apply(model, *configs)
        differences = _describe_difference(metadata["base"], fingerprint(model))
        if differences and strict:
            raise AdapterMismatchError(f"adapter '{target}' does not fit this base model: " + "; ".join(differences))
        parameters = {name: parameter for name, (parameter, _, _) in named_tracked_parameters(model).items()}
        missing, unexpected = sorted(set(parameters) - set(tensors)), sorted(set(tensors) - set(parameters))
        if unexpected or (missing and strict):
            raise AdapterMismatchError(
                f"adapter '{target}' does not match the model's trainable parameters: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            )
        for name, tensor in tensors.items():
            if parameters[name].shape != tensor.shape:
                raise AdapterMismatchError(
                    f"adapter '{target}': '{name}' has shape {tuple(tensor.shape)}, "
                    f"model {tuple(parameters[name].shape)}")
        with torch.no_grad():  # last, once everything fits: some parameters are the base's own (unfrozen norms)
            for name, tensor in tensors.items():
                parameters[name].copy_(tensor.to(parameters[name].dtype))
    if "base_model" in metadata and hasattr(model, "resize"):  # preprocess images as the adapter was trained
        model.resize = metadata["base_model"].get("resize", "resize")
    if hasattr(model, "answer_protocol"):  # and answer as it was trained (files without one: one plain pass)
        model.answer_protocol = metadata.get("answer_protocol")
    return model


METRICS_FILE_NAME = "metrics.json"  # a run's evaluation figures, beside its adapter


def adapter_facts(path: str | os.PathLike) -> dict[str, Any]:
    """What an adapter file says about itself, for `peft-vlm info` and its model card: file, base build and
    fingerprint, methods, trainable parameters per method/group, training data and steps, answer protocol, and the
    evaluation figures of `metrics.json` beside it (None where there are none)."""
    metadata, tensors = read_adapter(path)
    target = _adapter_path(path)
    counts: dict[str, int] = {}
    for name, tensor in tensors.items():
        owner = metadata["groups"].get(name, "?")
        counts[owner] = counts.get(owner, 0) + tensor.numel()
    protocol = metadata.get("answer_protocol")
    metrics = target.parent / METRICS_FILE_NAME
    return {
        "file": target, "version": metadata["peft_vlm_version"], "fingerprint": metadata["base"],
        "base_model": metadata.get("base_model"), "methods": {e["method"]: e["config"] for e in metadata["methods"]},
        "parameters": dict(sorted(counts.items())), "training": metadata.get("training"),
        "answer_protocol": protocol.describe() if protocol else "none recorded (one plain pass)",
        "metrics": json.loads(metrics.read_text()) if metrics.is_file() else None,
    }


def describe_adapter(path: str | os.PathLike) -> str:
    """A human-readable account of an adapter file (for `peft-vlm info`)."""
    facts = adapter_facts(path)
    target, training = facts["file"], facts["training"] or {}
    lines = [
        f"file: {target}",
        f"size: {target.stat().st_size:,} bytes",
        f"peft_vlm version: {facts['version']}",
        "base model: " + (json.dumps(facts["base_model"], sort_keys=True) if facts["base_model"] else "not recorded"),
        "base: " + ", ".join(f"{k}={v}" for k, v in facts["fingerprint"].items() if k != "weights"),
        "methods:",
    ]
    lines += [f"  - {method}: {json.dumps(config, sort_keys=True)}" for method, config in facts["methods"].items()]
    lines.append("data: " + (json.dumps(training["data"], sort_keys=True) if "data" in training else "not recorded"))
    lines.append(f"steps: {training.get('steps', 'not recorded')}")
    lines.append("answer protocol: " + facts["answer_protocol"])
    lines.append("parameters (method/group):")
    lines += [f"  {owner:<32} {count:>14,}" for owner, count in facts["parameters"].items()]
    lines.append(f"  {'total':<32} {sum(facts['parameters'].values()):>14,}")
    if facts["metrics"]:
        lines.append("metrics: " + json.dumps({k: v for k, v in facts["metrics"].items() if k != "answer_protocol"},
                                              sort_keys=True))
    return "\n".join(lines)
