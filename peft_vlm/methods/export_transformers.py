"""`pv.export_transformers(model, dir)`: a folder that plain `transformers` loads, with the methods folded in.

The folder holds `config.json`, `model.safetensors`, the generation config and the processor's files, and loads with
`AutoModelForImageTextToText.from_pretrained(dir)` + `AutoProcessor.from_pretrained(dir)`, no peft_vlm needed.
A wrapped transformers VLM is written in its own architecture; mergeable methods (LoRA, bias/scale) are merged for
the export and unmerged again after, so the model in memory is left as it was. Methods that change the computation
beyond the base's weights (adaption prompts, early fusion, the visual expert, gated cross-attention, ...) have no
native form and are refused by name.

Merged bias/scale gives linear layers a bias the base may not have. The export turns the architecture's own bias
switches on where its config has them (llama's `attention_bias` / `mlp_bias`), writes zero biases for the other
layers those switches add, and refuses a non-zero bias the architecture has no place for, naming the layers.

The folder is written beside its destination under a temporary name and renamed into place when complete, so a write
that fails (a full disk) leaves what was there before. A folder that is not empty is replaced only with
`overwrite=True`; the base model's own folder (or one holding it) never is.
"""
from __future__ import annotations

import copy
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from peft_vlm.errors import ConfigError, PeftVlmError
from peft_vlm.methods.apply import merge, unmerge
from peft_vlm.methods.bias_scale import BiasScale
from peft_vlm.runtime.attention import PREFIX
from peft_vlm.runtime.file_modes import like_other_outputs
from peft_vlm.runtime.tracking import state_of

#: Built-in parts whose trained weights are the base's own (they need no merging).
NATIVE_PARTS = ("connector", "projector", "vision_tower")
#: Config switches that give a decoder's linear layers a bias, by the submodule the layers sit in.
BIAS_SWITCHES = {"self_attn": "attention_bias", "mlp": "mlp_bias"}


def _refuse_unexportable(model: nn.Module) -> None:
    state = state_of(model, create=False)
    entries = [] if state is None else state.applied
    foreign = [e.name for e in entries if e.name not in NATIVE_PARTS and (e.method is None or not e.method.mergeable)]
    if foreign:
        raise PeftVlmError(
            f"export_transformers: method(s) {', '.join(foreign)} have no native transformers form (only methods "
            "that merge into the base weights, LoRA and bias/scale, export); save them with pv.save_adapter instead"
        )
    if any(type(p).__name__ in ("Params4bit", "Int8Params") for p in model.parameters()):
        raise PeftVlmError("export_transformers: the base is quantized (4/8-bit); load it in full precision to export")


def _unmerged_parts(model: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, (LoraLayer, BiasScale)) for m in model.modules())


def _plain_config(config):
    """A copy of `config` with the attention implementation peft_vlm switched to set back to the base one."""
    config = copy.deepcopy(config)
    for sub in [config, *(getattr(config, key) for key in config.sub_configs)]:
        current = getattr(sub, "_attn_implementation", None)
        if isinstance(current, str) and current.startswith(PREFIX):
            sub._attn_implementation = current[len(PREFIX):]
    return config


def _fit_biases(state: dict[str, torch.Tensor], config, build) -> tuple[dict[str, torch.Tensor], object]:
    """Turn on the bias switches the merged biases need, then make the state's keys those of the architecture."""
    text = config.get_text_config()
    expected = build(config).state_dict()
    extra = sorted(set(state) - set(expected))
    switches = {BIAS_SWITCHES[part] for name in extra for part in name.split(".") if part in BIAS_SWITCHES}
    for switch in (s for s in switches if hasattr(text, s)):
        setattr(text, switch, True)
    expected = build(config).state_dict() if switches else expected
    homeless = [n for n in sorted(set(state) - set(expected)) if bool(state[n].any())]
    if homeless:
        layers = sorted({n.rsplit(".", 2)[-2] for n in homeless})
        raise PeftVlmError(
            f"export_transformers: the merged bias/scale gives {', '.join(layers)} a bias that "
            f"{config.model_type} has no place for ({len(homeless)} tensors, e.g. {homeless[0]}); apply "
            f"BiasScaleConfig(exclude={layers}) to export this architecture"
        )
    fitted = {n: t for n, t in state.items() if n in expected}
    for name in sorted(set(expected) - set(state)):
        if not name.endswith(".bias"):
            raise PeftVlmError(f"export_transformers: the model has no tensor for '{name}' of {config.model_type}")
        fitted[name] = torch.zeros(expected[name].shape, dtype=state[name[: -len("bias")] + "weight"].dtype)
    return fitted, config


def _save(model_class, config, state: dict[str, torch.Tensor], generation_config, directory: Path) -> None:
    with torch.device("meta"):
        exported = model_class(config)
    exported.load_state_dict(state, strict=True, assign=True)
    if generation_config is not None:
        exported.generation_config = copy.deepcopy(generation_config)
    exported.save_pretrained(directory)


def export_wrapped(model: nn.Module, directory: Path) -> None:
    """A wrapped transformers VLM, in its own architecture, with its processor."""
    base = model.model
    config = _plain_config(base.config)
    state = {name: tensor.detach().cpu() for name, tensor in base.state_dict().items()}

    def build(cfg):
        with torch.device("meta"):
            return type(base)(cfg)

    state, config = _fit_biases(state, config, build)
    _save(type(base), config, state, base.generation_config, directory)
    _pad_left(model.tokenizer)
    model.processor.save_pretrained(directory)


# LLaVA's projector is linear_1 -> act -> linear_2; how each connector built here fills it.
LLAVA_PROJECTORS = {"mlp2x_gelu": "gelu", "linear": "linear"}
IMAGE_TOKEN = "<image>"


def _llava_projector(connector: nn.Module, name: str, hidden: int) -> dict[str, torch.Tensor]:
    first, second = (connector.mlp[0], connector.mlp[2]) if name == "mlp2x_gelu" else (connector.proj, None)
    state = {"linear_1.weight": first.weight, "linear_1.bias": first.bias}
    if second is None:  # a linear connector: identity activation and an identity second layer
        state["linear_2.weight"] = torch.eye(hidden, dtype=first.weight.dtype)
        state["linear_2.bias"] = torch.zeros(hidden, dtype=first.weight.dtype)
    else:
        state.update({"linear_2.weight": second.weight, "linear_2.bias": second.bias})
    return {f"model.multi_modal_projector.{k}": v.detach().cpu() for k, v in state.items()}


def _pad_left(tokenizer) -> None:
    """Left padding in the saved tokenizer too (saving writes `init_kwargs`): as peft_vlm pads, so that batched
    generation continues every row at its end."""
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"


def _image_token(tokenizer, embeddings: int):
    """A copy of the tokenizer with LLaVA's image token, its id, and whether that id needs a new embedding row."""
    tokenizer = copy.deepcopy(tokenizer)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    _pad_left(tokenizer)
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    return tokenizer, token_id, token_id >= embeddings


def check_llava(model: nn.Module) -> None:
    """Refuse, before anything is written, a model built here that LLaVA's architecture cannot reproduce."""
    tower = model.vision_tower
    if model.connector_name not in LLAVA_PROJECTORS or not hasattr(tower, "image_processor"):
        raise ConfigError(
            "export_transformers: a model built here exports as LLaVA when it has a transformers vision tower "
            f"(vision='transformers:PATH') and a {' or '.join(LLAVA_PROJECTORS)} connector; this one has "
            f"{type(tower).__name__} and connector '{model.connector_name}'"
        )
    if tower.patch_inputs:
        raise ConfigError(
            f"export_transformers: the {tower.description['transformers']} tower (SigLIP 2, NaFlex) takes flattened "
            "patches with their pixel_attention_mask and spatial_shapes, which LLaVA's vision tower call does not "
            "pass; LLaVA exports need a fixed-grid tower (CLIP, SigLIP). Save the adapter with pv.save_adapter"
        )
    if tower.prefix_tokens > 1 or model.image_boundaries or not model.images_in_sequence:
        raise ConfigError("export_transformers: LLaVA takes one class token at most, no image boundaries and the "
                          "images in the sequence")


def export_llava(model: nn.Module, directory: Path) -> None:
    """A model built here from a transformers CLIP / SigLIP tower and a linear or mlp2x_gelu connector, as LLaVA."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tower, lm = model.vision_tower, model.language_model
    text_config = _plain_config(lm.config)
    tokenizer, image_id, new_row = _image_token(model.tokenizer, lm.get_input_embeddings().num_embeddings)
    state = {f"model.language_model.{k[len('model.'):]}": v.detach().cpu()
             for k, v in lm.state_dict().items() if k.startswith("model.")}
    state["lm_head.weight"] = lm.get_output_embeddings().weight.detach().cpu()
    if new_row:  # the image token's own row is never read (its embedding is replaced), its logit is suppressed
        for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            state[key] = torch.cat([state[key], state[key].new_zeros(1, state[key].shape[1])])
        text_config.vocab_size += 1
    state.update({f"model.vision_tower.{k}": v.detach().cpu() for k, v in tower.model.state_dict().items()})
    state.update(_llava_projector(model.connector, model.connector_name, text_config.hidden_size))
    config = LlavaConfig(
        vision_config=_plain_config(tower.model.config).to_dict(), text_config=text_config.to_dict(),
        image_token_id=image_id, projector_hidden_act=LLAVA_PROJECTORS[model.connector_name],
        vision_feature_layer=tower.feature_layer, multimodal_projector_bias=True,
        vision_feature_select_strategy="default" if tower.prefix_tokens else "full",
        tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)),
    )
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")

    def build(cfg):
        with torch.device("meta"):
            return LlavaForConditionalGeneration(cfg)

    state, config = _fit_biases(state, config, build)
    generation = copy.deepcopy(lm.generation_config)
    if new_row:
        generation.suppress_tokens = [image_id]
    _save(LlavaForConditionalGeneration, config, state, generation, directory)
    template = getattr(model.tokenizer, "chat_template", None) if model.use_chat_template else None
    LlavaProcessor(image_processor=tower.image_processor, tokenizer=tokenizer, patch_size=tower.model.config.patch_size,
                   vision_feature_select_strategy=config.vision_feature_select_strategy,
                   num_additional_image_tokens=tower.prefix_tokens, chat_template=template,
                   image_token=IMAGE_TOKEN).save_pretrained(directory)


def export_transformers(model: nn.Module, directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write `model` (its mergeable methods folded in) as a transformers folder; returns the folder.

    A wrapped transformers VLM keeps its architecture. Methods with no native form are refused by name. A folder
    that is not empty is replaced only with `overwrite=True`, and only once the new one is complete."""
    given = Path(directory).expanduser()
    directory = given.resolve()  # a symbolic link: the folder it names is replaced
    _refuse_unexportable(model)
    exporter = _exporter_for(model)
    _check_destination(model, directory, overwrite)
    staging = directory.with_name(f".{directory.name}.{os.getpid()}.partial")
    try:
        shutil.rmtree(staging, ignore_errors=True)  # left by a killed export that had this pid
        staging.mkdir(parents=True)
    except OSError as error:
        raise ConfigError(f"export_transformers: cannot write '{directory}' ({error.strerror or error})") from None
    try:
        with _merged_for_export(model):
            exporter(model, staging)
        like_other_outputs(staging)
        _replace(directory, staging)
    except OSError as error:
        raise PeftVlmError(f"export_transformers: writing '{directory}' failed ({error.strerror or error}); "
                           "it was left as it was") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return given


def _base_paths(model: nn.Module) -> list[Path]:
    """The files and folders the base model was loaded from (its language model, its tower)."""
    names = [getattr(module, "name_or_path", None) for module in model.modules()]
    names.append(getattr(getattr(model, "vision_tower", None), "pretrained", None))
    return [Path(name).resolve() for name in names if isinstance(name, str) and name and Path(name).exists()]


def _check_destination(model: nn.Module, directory: Path, overwrite: bool) -> None:
    for base in _base_paths(model):
        if base == directory or directory in base.parents:
            raise ConfigError(f"export_transformers: '{directory}' holds the base model ('{base}'), which an export "
                              "never replaces; choose another folder")
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"export_transformers: '{directory}' is a file, not a folder; choose another folder")
    for parent in directory.parents:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"export_transformers: '{directory}' lies in '{parent}', which is a file, not a folder")
    if not overwrite and directory.is_dir() and any(directory.iterdir()):
        what = "a model folder" if (directory / "config.json").exists() else "a folder that is not empty"
        raise ConfigError(f"export_transformers: '{directory}' is {what}; pass overwrite=True (--overwrite) to "
                          "replace it")


@contextmanager
def _merged_for_export(model: nn.Module):
    """The mergeable methods merged for the export, then unmerged; the base weights merging rewrote are then put back
    from copies, since unmerging restores them only up to rounding."""
    from peft.tuners.lora import LoraLayer

    if not _unmerged_parts(model):
        yield
        return
    layers = [m.get_base_layer() for m in model.modules() if isinstance(m, LoraLayer)]
    layers += [m for m in model.modules() if any(isinstance(child, BiasScale) for child in m.children())]
    saved = {p: p.detach().clone() for layer in layers for p in layer.parameters(recurse=False)}
    merge(model)
    try:
        yield
    finally:
        unmerge(model)
        with torch.no_grad():
            for parameter, copy_ in saved.items():
                parameter.copy_(copy_)


def _replace(directory: Path, staging: Path) -> None:
    """Rename the complete `staging` folder to `directory`; what was there is removed only once the new one is in."""
    if not directory.exists():
        os.replace(staging, directory)
        return
    previous = staging.with_name(staging.name + "-previous")
    os.replace(directory, previous)
    try:
        os.replace(staging, directory)
    except OSError:
        os.replace(previous, directory)
        raise
    shutil.rmtree(previous, ignore_errors=True)


#: wrapped architectures whose export has not been shown to reload in plain transformers with the same logits
UNVERIFIED_EXPORTS = {"gemma3": "Gemma 3"}


def _exporter_for(model: nn.Module):
    if hasattr(model, "processor") and hasattr(model, "family"):
        if model.architecture in UNVERIFIED_EXPORTS:
            raise ConfigError(f"export_transformers: exporting a wrapped {UNVERIFIED_EXPORTS[model.architecture]} is "
                              "not supported yet (its exported folder is not verified to reload in transformers); "
                              "save the adapter with pv.save_adapter instead")
        return export_wrapped
    if hasattr(model, "vision_tower") and hasattr(model, "connector"):
        check_llava(model)
        return export_llava
    raise ConfigError(
        f"export_transformers: no transformers form for a {type(model).__name__}; wrapped transformers VLMs and "
        "models built here with a transformers vision tower export"
    )
