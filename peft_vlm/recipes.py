"""Recipes: one YAML file per paper setup, run with `peft-vlm train RECIPE.yaml`.

    model:    language_model (path, hub id, or "embedded"), vision (open_clip name or "embedded"),
              vision_pretrained, connector, load_in_4bit
    methods:  presets or method names from adapters/, or {method: NAME, option: value, ...}
    data:     one group:  train: {format, path, ...}
              joint:      captions: {...}, instructions: {...}
              and resize, max_length, bad_samples, image_root
    train:    TrainConfig fields
    full:     overrides applied by `peft-vlm train RECIPE --full` (e.g. `train.max_steps: 1000`)
    stages:   optional list of {name, methods, data, train} run in order on the same model (LLaVA's two stages);
              each stage adds its methods and overrides data/train
    eval:     {format, split/path, limit, grey_image, zero_shot, text_only_ceiling, verify_reload, batch_size, curve}
              evaluated after training (verify_reload: load the saved adapter onto a freshly built base and answer
              the first N questions again, or all with `true`; curve: {every, per_type}: accuracy against steps,
              real and grey image, on `per_type` questions of each type every `every` steps, drawn as
              accuracy_curve.png). With train.mixed_precision bf16, evaluation runs under the same bf16 autocast.

Any value can be overridden from the command line: `--set train.max_steps=5 --set data.train.path=x.json`.
"data formats": llava, caption, coco, alpaca (files), easy_vqa and easy_vqa_captions (the embedded demo data).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from peft_vlm.errors import ConfigError

EMBEDDED = "embedded"


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` as a string (it wants `1.0e-4`); learning rates are written the short way."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
STREAMS = ("train", "captions", "instructions")


def load_recipe(path: str | os.PathLike, overrides: list[str] = (), full: bool = False) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no recipe file at '{path}'")
    try:
        recipe = _yaml(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"recipe '{path}' is not valid YAML: {error}") from None
    if not isinstance(recipe, dict):
        raise ConfigError(f"recipe '{path}' must be a mapping of sections (model, methods, data, train, eval)")
    sections = {"name", "description", "paper", "hardware", "model", "methods", "data", "train", "stages", "eval", "full"}
    unknown = sorted(set(recipe) - sections)
    if unknown:
        raise ConfigError(f"recipe '{path}': unknown section(s) {', '.join(unknown)}")
    longer = recipe.pop("full", None) or {}
    if full and not longer:
        raise ConfigError(f"recipe '{path}' has no 'full' section for --full")
    for override in [*(f"{key}={json.dumps(value)}" for key, value in longer.items() if full), *overrides]:
        apply_override(recipe, override)
    recipe.setdefault("name", path.stem)
    return recipe


def apply_override(recipe: dict, override: str) -> None:
    """`section.key=value` (value parsed as YAML, so numbers, booleans and lists work); a number indexes a list
    (`stages.1.train.learning_rate=1e-4`)."""
    key, separator, value = override.partition("=")
    if not separator or not key:
        raise ConfigError(f"override '{override}' must look like section.key=value")
    *parents, leaf = key.split(".")
    node = recipe
    for part in parents:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise ConfigError(f"override '{override}': '{part}' is not a section")
    if isinstance(node, list) and leaf.isdigit() and int(leaf) < len(node):
        node[int(leaf)] = _yaml(value)
    elif isinstance(node, dict):
        node[leaf] = _yaml(value)
    else:
        raise ConfigError(f"override '{override}': cannot set '{leaf}' there")


def build_model(spec: dict):
    """A VisionLanguageModel from the recipe's `model` section."""
    from peft_vlm.embedded.models import CONTRASTIVE_VISION, default_language_model_path, register_default_vision
    from peft_vlm.model.vision_language_model import VisionLanguageModel

    spec = {key: value for key, value in spec.items() if value is not None}
    language_model = spec.pop("language_model", EMBEDDED)
    vision = spec.pop("vision", EMBEDDED)
    if language_model == EMBEDDED:
        language_model = default_language_model_path()
    if vision == EMBEDDED:
        vision = register_default_vision()
    elif vision == CONTRASTIVE_VISION:  # trained on first use (minutes), then read from the cache
        from peft_vlm.embedded.tower_pretraining import PRETRAINED_VISION, pretrained_tower

        vision, spec["vision_pretrained"] = PRETRAINED_VISION, pretrained_tower()
        # the last block: a linear probe reads shape there at 83%, at 76% from the second to last
        spec["vision_options"] = {"feature_layer": -1, **spec.get("vision_options", {})}
    elif isinstance(vision, list):  # two fused towers, either of them may be the embedded one
        if CONTRASTIVE_VISION in vision:
            raise ConfigError(
                f"model.vision: fused towers take no weights file per tower, so {CONTRASTIVE_VISION!r} (a pretrained "
                f"tower) cannot be one of them; use {EMBEDDED!r} or open_clip model names in the list"
            )
        vision = [register_default_vision() if tower == EMBEDDED else tower for tower in vision]
    known = {"vision_pretrained", "connector", "load_in_4bit", "vision_options", "dtype", "train_vision_tower",
             "image_boundaries", "use_chat_template", "attn_implementation", "resize"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ConfigError(f"model section: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    resize = spec.pop("resize", "resize")  # written by `base_spec` for adapter files; recipes set data.resize
    model = VisionLanguageModel.from_pretrained(language_model, vision=vision, **spec)
    model.resize = resize
    return model


def method_specs(entries: list) -> list:
    """Presets/method names stay strings; {method: NAME, ...} mappings become method configs."""
    from peft_vlm.methods.registry import get_method

    specs = []
    for entry in entries or []:
        if isinstance(entry, str):
            specs.append(entry)
        elif isinstance(entry, dict) and "method" in entry:
            options = dict(entry)
            specs.append(get_method(options.pop("method")).config_from_dict(options))
        else:
            raise ConfigError(f"methods: each entry is a preset or method name, or a mapping with 'method'; got {entry!r}")
    return specs


def build_dataset(spec: dict, encoder, shared: dict, report=None):
    """One dataset from a `data` entry: a file in a known format, or the embedded easy-VQA data."""
    from peft_vlm.data import SampleDataset, open_dataset
    from peft_vlm.data import easy_vqa

    spec = {**shared, **spec}
    data_format = spec.get("format")
    policy = spec.get("bad_samples", "error")
    if data_format == "easy_vqa":
        records = easy_vqa.instruction_samples(spec.get("split", "train"), spec.get("limit"), **spec.get("options", {}))
        return SampleDataset(records, encoder, policy, report)
    if data_format == "easy_vqa_captions":
        return SampleDataset(easy_vqa.caption_samples(spec.get("split", "train")), encoder, policy, report)
    if "path" not in spec:
        raise ConfigError(f"data entry {spec!r} needs a 'path' (or format easy_vqa / easy_vqa_captions)")
    return open_dataset(spec["path"], data_format, encoder, policy, spec.get("image_root"), report=report)


def stages(recipe: dict) -> list[dict]:
    """The recipe as a list of stages (a recipe without `stages` is one stage)."""
    base = {key: recipe.get(key) for key in ("methods", "data", "train")}
    if not recipe.get("stages"):
        return [{"name": recipe["name"], **base}]
    result = []
    for index, stage in enumerate(recipe["stages"]):
        data = dict(base["data"] or {})
        if any(stream in stage.get("data", {}) for stream in STREAMS):  # a stage's streams replace the recipe's
            data = {key: value for key, value in data.items() if key not in STREAMS}
        data.update(stage.get("data", {}))
        result.append({
            "name": stage.get("name", f"stage{index + 1}"),
            # the recipe's own methods come with the first stage; later stages add theirs
            "methods": ([] if index else list(base["methods"] or [])) + list(stage.get("methods", [])),
            "data": data,
            "train": {**(base["train"] or {}), **stage.get("train", {})},
        })
    return result


def evaluation_questions(spec: dict) -> list:
    """Questions for `vqa_accuracy`: easy-VQA's test split (evenly spaced `limit` questions) or a LLaVA-format file."""
    from peft_vlm.data import easy_vqa, read_dataset
    from peft_vlm.evaluation.vqa import Question

    if spec.get("format") == "easy_vqa":
        samples = easy_vqa.instruction_samples(spec.get("split", "test")).samples
        kind_of = easy_vqa.question_type
    elif "path" in spec:
        records = read_dataset(spec["path"], spec.get("format", "llava"), spec.get("image_root"))
        samples = [records[i] for i in range(len(records))]
        kind_of = None
    else:
        raise ConfigError("eval section needs format: easy_vqa, or a path to a LLaVA-format file")
    limit = spec.get("limit")
    if limit and limit < len(samples):
        samples = [samples[i * len(samples) // limit] for i in range(limit)]
    return [Question.from_sample(sample, kind_of) for sample in samples]


def evaluation_precision(mixed_precision: str | None):
    """A context factory for evaluation: the bf16 autocast training ran under on the CPU, else full precision."""
    import contextlib

    import torch

    if mixed_precision == "bf16" and not torch.cuda.is_available():
        return lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext


def accuracy_curve(model, eval_spec: dict, questions: list, output_dir: str, precision) -> list:
    """The trainer callbacks of `eval.curve: {every, per_type}` (none without it); its first point is the model
    before training."""
    curve = eval_spec.get("curve")
    if not curve or not questions:
        return []
    from peft_vlm.evaluation.curve import AccuracyCurve, evenly_by_type

    sample = evenly_by_type(questions, int(curve.get("per_type", 40)))
    tracker = AccuracyCurve(sample, int(curve["every"]), output_dir, batch_size=int(eval_spec.get("batch_size", 16)))
    with precision():
        tracker.measure(model, 0)

    def evaluate(trainer, step):
        with precision():
            tracker(trainer, step)

    return [evaluate]


def run_recipe(recipe: dict, log=print) -> dict[str, Any]:
    """Build the model, train every stage, save the adapter, evaluate; returns the figures it printed."""
    import functools
    import time

    from accelerate.utils import set_seed

    from peft_vlm.data import SampleEncoder
    from peft_vlm.methods.apply import apply
    from peft_vlm.methods.summary import trainable_summary
    from peft_vlm.training import JointTrainer, TrainConfig
    from peft_vlm.evaluation import vqa

    start = time.time()
    figures: dict[str, Any] = {"recipe": recipe["name"]}
    # The connector's and the methods' initial weights come from the global generators: seed them first, so a
    # recipe gives the same run whatever ran before it in the process (a tower pretrained on first use, say).
    set_seed(int((recipe.get("train") or {}).get("seed", TrainConfig.seed)))
    model = build_model(recipe.get("model") or {})
    all_stages = stages(recipe)
    model.resize = (all_stages[0]["data"] or {}).get("resize") or model.resize  # the zero-shot run sees it too
    eval_spec = recipe.get("eval") or {}
    questions = evaluation_questions(eval_spec) if eval_spec else []
    precision = evaluation_precision((recipe.get("train") or {}).get("mixed_precision"))
    answer = functools.partial(vqa.vqa_accuracy, batch_size=int(eval_spec.get("batch_size", 16)))
    if questions and eval_spec.get("zero_shot"):
        with precision():
            figures["zero_shot"] = answer(model, questions, progress=True)
        log(f"zero-shot (untouched model): {figures['zero_shot']}")
    output_root = Path((recipe.get("train") or {}).get("output_dir", f"out/{recipe['name']}"))
    result = None
    for stage in all_stages:
        apply(model, *method_specs(stage["methods"]))
        data = dict(stage["data"] or {})
        shared = {k: data.pop(k) for k in ("bad_samples", "image_root") if k in data}
        resize, max_length = data.pop("resize", None), data.pop("max_length", None)
        encoder = SampleEncoder.for_model(model, resize=resize, max_length=max_length)
        # a stream set to null (e.g. `--set data.captions=null`) is left out
        datasets = {stream: build_dataset(spec, encoder, shared) for stream in STREAMS if (spec := data.pop(stream, None))}
        if data:
            raise ConfigError(f"data section: unknown option(s) {', '.join(sorted(data))}")
        train_options = dict(stage["train"] or {})
        train_options["output_dir"] = str(output_root / stage["name"]) if len(all_stages) > 1 else str(output_root)
        config = TrainConfig.from_dict(train_options)
        log(f"stage {stage['name']}:\n{trainable_summary(model)}")
        trainer = JointTrainer(
            model, config,
            data=datasets.get("train"), caption_data=datasets.get("captions"), instruction_data=datasets.get("instructions"),
            callbacks=accuracy_curve(model, eval_spec, questions, config.output_dir, precision),
        )
        result = trainer.train()
        for dataset in datasets.values():
            if dataset.report.bad or dataset.report.truncated:
                log(dataset.report.summary())
        if not trainer.accelerator.is_main_process:
            return figures
    figures["adapter"] = str(result.adapter_path)
    figures["adapter_bytes"] = result.adapter_path.stat().st_size
    figures["trainable_parameters"] = trainable_summary(model).trainable_parameters
    figures["train_seconds"] = result.seconds
    if questions:
        with precision():
            figures["accuracy"] = answer(model, questions, progress=True)
            if eval_spec.get("grey_image"):
                figures["grey_image"] = answer(model, questions, replace_image=vqa.grey_image(model))
        if eval_spec.get("format") == "easy_vqa" and eval_spec.get("text_only_ceiling"):
            from peft_vlm.data import easy_vqa

            figures["text_only_ceiling"] = easy_vqa.text_only_ceiling()
        if eval_spec.get("verify_reload"):
            # the shared file must be the whole story: a fresh base plus the adapter answers exactly the same (on
            # the first `verify_reload` questions, or all of them with `true`)
            from peft_vlm.methods.adapter_file import load_adapter

            count = len(questions) if eval_spec["verify_reload"] is True else int(eval_spec["verify_reload"])
            reloaded = load_adapter(build_model(recipe.get("model") or {}), result.adapter_path)
            with precision():
                figures["reloaded"] = answer(reloaded, questions[:count])
            answers = [given for _, _, given in figures["accuracy"].examples[:count]]
            figures["reload_identical"] = answers == [given for _, _, given in figures["reloaded"].examples]
    figures["wall_seconds"] = time.time() - start
    return figures

