"""Recipes: one YAML file per paper setup, run with `peft-vlm train RECIPE.yaml`.

    model:    language_model (path, hub id, or "embedded"), vision (open_clip name or "embedded"),
              vision_pretrained, connector, load_in_4bit
    methods:  presets or method names from adapters/, or {method: NAME, option: value, ...}
    data:     one group:  train: {format, path, ...}
              joint:      captions: {...}, instructions: {...}
              and resize, max_length, bad_samples, image_root (image paths are relative to each data
              file's folder unless it is given), max_skipped_share (bad_samples: skip stops a run that skips more
              than this share of its rows, 0.05, or loses a whole batch)
    train:    TrainConfig fields
    full:     overrides applied by `peft-vlm train RECIPE --full` (e.g. `train.max_steps: 1000`)
    stages:   optional list of {name, methods, data, train} run in order on the same model (LLaVA's two stages);
              each stage adds its methods and overrides data/train
    eval:     {format, split/path, limit, grey_image, zero_shot, text_only_ceiling, verify_reload, batch_size, curve,
               max_new_tokens, answer_after, describe_first}
              evaluated after training (verify_reload: load the saved adapter onto a freshly built base and answer
              the first N questions again, or all with `true`; zero_shot: the untouched model, all or the first N;
              curve: {every, per_type}: accuracy against steps,
              real and grey image, on `per_type` questions of each type every `every` steps, drawn as
              accuracy_curve.png). With train.mixed_precision bf16, evaluation runs under the same bf16 autocast.

Any value can be overridden from the command line: `--set train.max_steps=5 --set data.train.path=x.json`.
"data formats": llava, caption, coco, alpaca (files), easy_vqa and easy_vqa_captions (the embedded demo data).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from peft_vlm.errors import ConfigError
from peft_vlm.options import at_least, check_options

EMBEDDED = "embedded"


MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_NODES = 100_000  # values in the recipe with every alias expanded: a recipe has hundreds


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` as a string (it wants `1.0e-4`); learning rates are written the short way.

    A key given twice in one mapping is an error naming it: PyYAML would keep the last one silently. (A key that
    overrides one merged in with `<<:` is not repeated.)"""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key '{key_node.value}' is given twice", key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _expanded_size(node, sizes: dict) -> int:
    """How many values `node` stands for once its aliases are expanded (each shared node counted once per use)."""
    if id(node) not in sizes:
        sizes[id(node)] = 0  # a recursive alias counts as nothing more
        children = ([child for pair in node.value for child in pair] if isinstance(node, yaml.MappingNode)
                    else node.value if isinstance(node, yaml.SequenceNode) else [])
        sizes[id(node)] = 1 + sum(_expanded_size(child, sizes) for child in children)
    return sizes[id(node)]


def _yaml(text: str):
    """The YAML document in `text`, refused when its aliases expand it beyond MAX_RECIPE_NODES values (a "billion
    laughs" recipe would hang every step that walks it)."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_size(node, {}) > MAX_RECIPE_NODES:
            raise yaml.YAMLError(f"its aliases expand it to over {MAX_RECIPE_NODES:,} values")
        return loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()


def _one_line(error: yaml.YAMLError) -> str:
    """A YAML error as one line: the problem and where it is."""
    problem, mark = getattr(error, "problem", None), getattr(error, "problem_mark", None)
    if problem and mark:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(error).split())


STREAMS = ("train", "captions", "instructions")
PATH_KEYS = ("path", "image_root", "output_dir", "language_model", "vision_pretrained")  # `~` is the home folder
SECTIONS = ("name", "description", "paper", "hardware", "model", "methods", "data", "train", "stages", "eval", "full")


# What each section accepts, as typed fields (checked by `validate_recipe` before anything is built).
@dataclass
class ModelSection:
    language_model: str | None = None
    vision: str | list | None = None  # an open_clip/timm name, "embedded", or two towers (names or mappings)
    vision_pretrained: str | None = None
    connector: str | None = None
    load_in_4bit: bool | None = None
    vision_options: dict | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] | None = None
    train_vision_tower: bool | None = None
    image_boundaries: tuple[str, str] | None = None
    use_chat_template: bool | None = None
    attn_implementation: str | None = None  # e.g. "eager": plain matmuls (faster than CPU SDPA in bf16)
    resize: str | None = None  # how the adapter's images were resized (base descriptions in adapter files)
    train_projector: bool | None = None  # a wrapped transformers VLM: its projector trains (group vision)


@dataclass
class DataSection:
    train: dict | None = None
    captions: dict | None = None
    instructions: dict | None = None
    resize: str | None = None
    max_length: int | None = field(default=None, metadata=at_least(1))
    bad_samples: str | None = None
    image_root: str | None = None  # image paths are relative to each data file's folder unless this is given
    max_skipped_share: float | None = None  # under bad_samples: skip, the share of rows a run may skip (0.05)


@dataclass
class StreamSection:
    format: str | None = None
    path: str | None = None
    split: str | None = None
    limit: int | None = field(default=None, metadata=at_least(1))
    options: dict | None = None
    image_root: str | None = None
    bad_samples: str | None = None
    max_skipped_share: float | None = None


@dataclass
class EvalSection:
    format: str | None = None
    path: str | None = None
    split: str | None = None
    limit: int | None = field(default=None, metadata=at_least(1))
    image_root: str | None = None
    grey_image: bool = False
    zero_shot: bool | int = field(default=False, metadata=at_least(0))  # true: every question; N: the first N
    text_only_ceiling: bool = False
    verify_reload: bool | int = field(default=False, metadata=at_least(0))  # true: every question; N: the first N
    batch_size: int | None = field(default=None, metadata=at_least(1))
    curve: dict | None = None  # {every: N, per_type: M}: accuracy against steps, accuracy_curve.png
    max_new_tokens: int | None = field(default=None, metadata=at_least(1))  # generated tokens per answer (8)
    answer_after: str | None = None  # score what follows this marker in the generation
    describe_first: bool = False  # two passes: the model describes the image, then answers after its description


@dataclass
class StageSection:
    name: str | None = None
    methods: list | None = None
    data: dict | None = None
    train: dict | None = None


def load_recipe(path: str | os.PathLike, overrides: list[str] = (), full: bool = False) -> dict[str, Any]:
    """The recipe at `path` with `--full` and `--set` overrides applied, validated (see `validate_recipe`)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"no recipe file at '{path}'")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise ConfigError(f"recipe '{path}' is {path.stat().st_size:,} bytes; a recipe is at most "
                          f"{MAX_RECIPE_BYTES:,}")
    try:
        recipe = _yaml(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"recipe '{path}' is not valid YAML: {_one_line(error)}") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError(f"recipe '{path}' is nested too deeply to be a recipe") from None
    if not recipe:
        raise ConfigError(f"recipe '{path}' is empty; a recipe has sections model, methods, data, train, eval")
    if not isinstance(recipe, dict):
        raise ConfigError(f"recipe '{path}' must be a mapping of sections (model, methods, data, train, eval)")
    _check_sections(recipe, f"recipe '{path}'")
    longer = recipe.pop("full", None) or {}
    if not isinstance(longer, dict):
        raise ConfigError(f"recipe '{path}': the 'full' section must map section.key to a value, got {longer!r}")
    if full and not longer:
        raise ConfigError(f"recipe '{path}' has no 'full' section for --full")
    for override in [*(f"{key}={json.dumps(value)}" for key, value in longer.items() if full), *overrides]:
        apply_override(recipe, override)
    recipe.setdefault("name", path.stem)
    _expand_user(recipe)
    validate_recipe(recipe, f"recipe '{path}'")
    return recipe


def _expand_user(node: Any) -> None:
    """`~` at the start of a path (PATH_KEYS, at any depth) becomes the home folder, as a shell would make it."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in list(items):
        if key in PATH_KEYS and isinstance(value, str) and value.startswith("~"):
            node[key] = os.path.expanduser(value)
        else:
            _expand_user(value)


def _check_sections(recipe: dict, where: str) -> None:
    unknown = sorted(set(recipe) - set(SECTIONS), key=str)
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {', '.join(map(str, unknown))}; "
                          f"sections: {', '.join(SECTIONS)}")


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping of option: value, got {value!r}")
    return value


def validate_recipe(recipe: dict, where: str = "recipe") -> None:
    """Check every section of a recipe: names, types and ranges of every option, each stage's methods, data and
    training options, and the eval section. Nothing is built; each error is a ConfigError naming the key."""
    from peft_vlm.training.config import TrainConfig

    _check_sections(recipe, where)
    if not isinstance(recipe.get("name"), str):
        raise ConfigError(f"{where}: name must be a string, got {recipe.get('name')!r}")
    model = check_options(ModelSection, _mapping(recipe.get("model"), f"{where}, model section"),
                          f"{where}, model section")
    if model.get("connector") is not None:
        from peft_vlm.model.connectors import check_connector

        check_connector(model["connector"], f"{where}, model section: ")
    check_options(EvalSection, _mapping(recipe.get("eval"), f"{where}, eval section"), f"{where}, eval section")
    listed = recipe.get("stages") or []
    if not isinstance(listed, list):
        raise ConfigError(f"{where}: stages must be a list of {{name, methods, data, train}}, got {listed!r}")
    for index, stage in enumerate(listed):
        check_options(StageSection, _mapping(stage, f"{where}, stage #{index + 1}"), f"{where}, stage #{index + 1}")
    for section in ("data", "train"):
        _mapping(recipe.get(section), f"{where}, {section} section")
    all_stages = stages(recipe)
    for stage in all_stages:
        at = f"{where}, stage '{stage['name']}'" if recipe.get("stages") else where
        method_specs(stage["methods"], f"{at}, methods")
        data = check_options(DataSection, _mapping(stage["data"], f"{at}, data section"), f"{at}, data section")
        for stream in STREAMS:
            if data.get(stream) is not None:
                share = check_options(StreamSection, data[stream], f"{at}, data.{stream}").get("max_skipped_share")
                _check_share(share, f"{at}, data.{stream}.max_skipped_share")
        _check_share(data.get("max_skipped_share"), f"{at}, data.max_skipped_share")
        train = {**(stage["train"] or {}), "output_dir": str(output_dir_of(recipe, stage, len(all_stages)))}
        try:
            TrainConfig.from_dict(train)
        except ConfigError as error:
            raise ConfigError(f"{at}, train section: {error}") from None


def _check_share(value, where: str) -> None:
    if value is not None and not 0 <= value <= 1:
        raise ConfigError(f"{where}: {value!r} is not a share between 0 and 1")


def run_dir(recipe: dict) -> Path:
    """The run's folder, train.output_dir (metrics.json goes there)."""
    return Path((recipe.get("train") or {}).get("output_dir", f"out/{recipe['name']}"))


def output_dir_of(recipe: dict, stage: dict, count: int) -> Path:
    """Where a stage writes its checkpoints and adapter: train.output_dir, with one folder per stage if several."""
    return run_dir(recipe) / stage["name"] if count > 1 else run_dir(recipe)


def check_recipe(recipe: dict) -> None:
    """Everything `run_recipe` can check before it builds a model: the recipe, and that every output folder can be
    written (a run must not learn at its first checkpoint, or its end, that its results cannot be saved)."""
    from peft_vlm.training.preflight import check_output_dir

    validate_recipe(recipe, f"recipe '{recipe.get('name', '?')}'")
    all_stages = stages(recipe)
    for stage in all_stages:
        check_output_dir(output_dir_of(recipe, stage, len(all_stages)))


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
            if node.get(part) is None:  # a missing or empty (null) section
                node[part] = {}
            node = node[part]
        else:
            raise ConfigError(f"override '{override}': '{part}' is not a section")
    try:
        value = _yaml(value)
    except yaml.YAMLError as error:
        raise ConfigError(f"override '{override}': the value is not valid YAML ({_one_line(error)})") from None
    if isinstance(node, list) and leaf.isdigit() and int(leaf) < len(node):
        node[int(leaf)] = value
    elif isinstance(node, dict):
        node[leaf] = value
    else:
        raise ConfigError(f"override '{override}': cannot set '{leaf}' there")


def build_model(spec: dict):
    """A VisionLanguageModel from the recipe's `model` section (the embedded default's names resolve in
    `VisionLanguageModel.from_pretrained`)."""
    from peft_vlm.model.connectors import check_connector
    from peft_vlm.model.vision_language_model import VisionLanguageModel
    from peft_vlm.model.weights_files import refuse_pickle_weights

    spec = {key: value for key, value in spec.items() if value is not None}
    if "connector" in spec:  # before a tower is pretrained or a language model loaded
        check_connector(spec["connector"], "model section: ")
    check_options(ModelSection, spec, "model section")
    refuse_pickle_weights(spec, "model section")
    language_model = spec.pop("language_model", EMBEDDED)
    vision = spec.pop("vision", EMBEDDED)
    resize = spec.pop("resize", "resize")  # written by `base_spec` for adapter files; recipes set data.resize
    model = VisionLanguageModel.from_pretrained(language_model, vision=vision, **spec)
    model.resize = resize
    return model


def method_specs(entries: list, where: str = "methods") -> list:
    """Presets/method names stay strings (checked to exist); {method: NAME, ...} mappings become method configs."""
    from peft_vlm.methods.presets import available_presets
    from peft_vlm.methods.registry import available_methods, config_from_entry

    if entries is not None and not isinstance(entries, list):
        raise ConfigError(f"{where}: expected a list of presets, method names or {{method: NAME, ...}}, "
                          f"got {entries!r}")
    specs = []
    for index, entry in enumerate(entries or []):
        if isinstance(entry, str):
            if entry not in available_presets() and entry not in available_methods():
                raise ConfigError(f"{where}: unknown method or preset '{entry}'; "
                                  f"presets: {', '.join(available_presets())}; "
                                  f"methods: {', '.join(sorted(available_methods()))}")
            specs.append(entry)
        elif isinstance(entry, dict):
            specs.append(config_from_entry(entry, f"{where} #{index + 1}"))
        else:
            raise ConfigError(f"{where}: each entry is a preset or method name, or a mapping with 'method'; "
                              f"got {entry!r}")
    return specs


def build_dataset(spec: dict, encoder, shared: dict, report=None):
    """One dataset from a `data` entry: a file in a known format, or the embedded easy-VQA data."""
    from peft_vlm.data import SampleDataset, open_dataset
    from peft_vlm.data import easy_vqa

    spec = {**shared, **spec}
    data_format = spec.get("format")
    policy = spec.get("bad_samples", "error")
    share = spec.get("max_skipped_share", 0.05)
    if data_format == "easy_vqa":
        records = easy_vqa.instruction_samples(spec.get("split", "train"), spec.get("limit"), **spec.get("options", {}))
        return SampleDataset(records, encoder, policy, report, share)
    if data_format == "easy_vqa_captions":
        return SampleDataset(easy_vqa.caption_samples(spec.get("split", "train")), encoder, policy, report, share)
    if "path" not in spec:
        raise ConfigError(f"data entry {spec!r} needs a 'path' (or format easy_vqa / easy_vqa_captions)")
    return open_dataset(spec["path"], data_format, encoder, policy, spec.get("image_root"), report=report,
                        max_skipped_share=share)


def stages(recipe: dict) -> list[dict]:
    """The recipe as a list of stages (a recipe without `stages` is one stage)."""
    base = {key: recipe.get(key) for key in ("methods", "data", "train")}
    if not recipe.get("stages"):
        return [{"name": recipe["name"], **base}]
    result = []
    for index, stage in enumerate(recipe["stages"]):
        data = dict(base["data"] or {})
        if any(stream in (stage.get("data") or {}) for stream in STREAMS):  # a stage's streams replace the recipe's
            data = {key: value for key, value in data.items() if key not in STREAMS}
        data.update(stage.get("data") or {})
        result.append({
            "name": stage.get("name", f"stage{index + 1}"),
            # the recipe's own methods come with the first stage; later stages add theirs
            "methods": ([] if index else list(base["methods"] or [])) + list(stage.get("methods") or []),
            "data": data,
            "train": {**(base["train"] or {}), **(stage.get("train") or {})},
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


def first(questions: list, count: bool | int) -> list:
    """All questions for `true`, else the first `count` (an eval option that takes either)."""
    return questions if count is True else questions[:int(count)]


def evaluation_precision(mixed_precision: str | None):
    """A context factory for evaluation: the bf16 autocast training ran under on the CPU, else full precision."""
    import contextlib

    import torch

    from peft_vlm.training.config import resolve_mixed_precision

    if resolve_mixed_precision(mixed_precision) == "bf16" and not torch.cuda.is_available():
        return lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext


def answer_protocol(recipe: dict):
    """How the recipe's model is trained to answer, which its adapter file records: the eval section's answer
    options (`describe_first`, `answer_after`, `max_new_tokens`, 8 by default), else describe-first where the
    training data is (`data.*.options.describe_first`), in the training run's precision."""
    from peft_vlm.data.answer_protocol import AnswerProtocol

    spec = recipe.get("eval") or {}
    options = {key: spec[key] for key in ("describe_first", "answer_after", "max_new_tokens")
               if spec.get(key) is not None}
    last = stages({"name": "", **recipe})[-1]  # the protocol of the last stage's data and precision
    if "describe_first" not in options:
        data = last["data"] or {}
        options["describe_first"] = any(bool(((data.get(stream) or {}).get("options") or {}).get("describe_first"))
                                        for stream in STREAMS)
    options.setdefault("max_new_tokens", 8)
    return AnswerProtocol(**options, precision=(last["train"] or {}).get("mixed_precision"))


def accuracy_curve(model, evaluation: "Evaluation", output_dir: str) -> list:
    """The trainer callbacks of `eval.curve: {every, per_type}` (none without it); its first point is the model
    before training."""
    curve = evaluation.spec.get("curve")
    if not curve or not evaluation.questions:
        return []
    from peft_vlm.evaluation.curve import AccuracyCurve, evenly_by_type

    sample = evenly_by_type(evaluation.questions, int(curve.get("per_type", 40)))
    tracker = AccuracyCurve(sample, int(curve["every"]), output_dir, batch_size=evaluation.batch_size)
    precision = evaluation_precision(model.answer_protocol.precision if model.answer_protocol else None)
    with precision():
        tracker.measure(model, 0)

    def evaluate(trainer, step):
        with precision():
            tracker(trainer, step)

    return [evaluate]


class Evaluation:
    """The recipe's `eval` section: its questions and batch size."""

    def __init__(self, recipe: dict):
        self.spec = recipe.get("eval") or {}
        self.questions = evaluation_questions(self.spec) if self.spec else []
        self.batch_size = int(self.spec.get("batch_size", 16))
        # the run's choice for its tower features holds for its evaluation too (None: decided by the evaluation)
        self.cache_vision_features = (recipe.get("train") or {}).get("cache_vision_features")

    def answer(self, model, count: bool | int = True, protocol=None, questions=None, **options):
        """`vqa_accuracy` on the first `count` questions (all for `true`; or on `questions`), answered by `protocol`
        (default: the model's `answer_protocol`) in the protocol's precision."""
        from peft_vlm.evaluation import vqa

        protocol = protocol or getattr(model, "answer_protocol", None)
        with evaluation_precision(protocol.precision if protocol else None)():
            options.setdefault("cache_vision_features", self.cache_vision_features)
            return vqa.vqa_accuracy(model, first(self.questions, count) if questions is None else questions,
                                    batch_size=self.batch_size,
                                    protocol=protocol or False, **options)


def run_recipe(recipe: dict, log=print) -> dict[str, Any]:
    """Build the model, train every stage, save the adapter, evaluate; returns the figures it printed."""
    import time

    from accelerate.utils import set_seed

    from peft_vlm.training import TrainConfig

    check_recipe(recipe)
    start = time.time()
    figures: dict[str, Any] = {"recipe": recipe["name"]}
    # The connector's and the methods' initial weights come from the global generators: seed them first, so a
    # recipe gives the same run whatever ran before it in the process (a tower pretrained on first use, say).
    set_seed(int((recipe.get("train") or {}).get("seed", TrainConfig.seed)))
    model = build_model(recipe.get("model") or {})
    model.resize = (stages(recipe)[0]["data"] or {}).get("resize") or model.resize  # the zero-shot run sees it too
    model.answer_protocol = answer_protocol(recipe)  # recorded in the adapter file, so that it answers the same way
    evaluation = Evaluation(recipe)
    if evaluation.questions and evaluation.spec.get("zero_shot"):
        # the untouched model was never taught to describe first: its plain answers are scored
        plain = dataclasses.replace(model.answer_protocol, describe_first=False, answer_after=None)
        figures["zero_shot"] = evaluation.answer(model, evaluation.spec["zero_shot"], progress=True, protocol=plain)
        log(f"zero-shot (untouched model): {figures['zero_shot']}")
    trainer, results = train_stages(model, recipe, evaluation, log)
    if not trainer.accelerator.is_main_process:
        return figures
    figures.update(evaluate_trained(model, recipe, evaluation, results[-1]))
    figures["train_seconds"] = sum(result.seconds for result in results)
    figures["steps"] = sum(result.steps for result in results)
    figures["wall_seconds"] = time.time() - start
    metrics = write_metrics(figures, run_dir(recipe) / "metrics.json", model)
    from peft_vlm.methods.model_card import write_model_card

    write_model_card(results[-1].adapter_path, json.loads(metrics.read_text()))  # now with its evaluation table
    return figures


def write_metrics(figures: dict[str, Any], path: Path, model) -> Path:
    """The run's figures as JSON beside its adapter: accuracies by question type, sizes, times, answer protocol."""
    def plain(value):
        return value.as_dict() if hasattr(value, "as_dict") else value

    metrics = {key: plain(value) for key, value in figures.items() if key != "adapter"}
    if model.answer_protocol is not None:
        metrics["answer_protocol"] = model.answer_protocol.to_dict()
    path.write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")
    return path


def check_every_group_has_data(model, datasets: dict, config, where: str) -> None:
    """Refuse a stage whose data leaves a trainable group untrained, e.g. after `--set data.captions=null` or
    `--set stages=null` removed the stream or stage that fed it: it would train nothing there, silently."""
    from peft_vlm.runtime.tracking import named_tracked_parameters

    groups = {group for _, _, group in named_tracked_parameters(model).values()}
    if not datasets:
        raise ConfigError(f"{where} has no training data: set data.train, or data.captions and data.instructions "
                          f"(was a stream or stage removed with --set?)")
    fed = groups if "train" in datasets else {
        *(config.caption_groups if "captions" in datasets else ()),
        *(config.instruction_groups if "instructions" in datasets else ())}
    if groups - fed:
        missing = ", ".join(sorted(groups - fed))
        raise ConfigError(f"{where}: trainable group(s) {missing} get no data from {', '.join(sorted(datasets))} "
                          f"(was data.captions or data.instructions, or the stage that fed them, removed with --set?)")


def write_recipe(recipe: dict, path: Path) -> Path:
    """The recipe as it ran (`--full` and `--set` applied) beside its adapter, so the run can be repeated."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def train_stages(model, recipe: dict, evaluation: Evaluation, log=print):
    """Apply each stage's methods and train it; (the last trainer, every stage's result)."""
    from peft_vlm.data import SampleEncoder
    from peft_vlm.methods.apply import apply
    from peft_vlm.methods.summary import trainable_summary
    from peft_vlm.training import JointTrainer, TrainConfig

    all_stages, results = stages(recipe), []
    for stage in all_stages:
        apply(model, *method_specs(stage["methods"]))
        data = dict(stage["data"] or {})
        shared = {k: data.pop(k) for k in ("bad_samples", "image_root", "max_skipped_share") if k in data}
        resize, max_length = data.pop("resize", None), data.pop("max_length", None)
        encoder = SampleEncoder.for_model(model, resize=resize, max_length=max_length)
        # a stream set to null (e.g. `--set data.captions=null`) is left out
        datasets = {stream: build_dataset(spec, encoder, shared)
                    for stream in STREAMS if (spec := data.pop(stream, None))}
        if data:
            raise ConfigError(f"data section: unknown option(s) {', '.join(sorted(data))}")
        train_options = dict(stage["train"] or {})
        train_options["output_dir"] = str(output_dir_of(recipe, stage, len(all_stages)))
        config = TrainConfig.from_dict(train_options)
        check_every_group_has_data(model, datasets, config, f"stage '{stage['name']}'")
        log(f"stage {stage['name']}:\n{trainable_summary(model)}")
        trainer = JointTrainer(
            model, config,
            data=datasets.get("train"), caption_data=datasets.get("captions"),
            instruction_data=datasets.get("instructions"),
            callbacks=accuracy_curve(model, evaluation, config.output_dir),
        )
        results.append(trainer.train())
        if trainer.accelerator.is_main_process:
            write_recipe(recipe, Path(config.output_dir) / "recipe.yaml")
        for dataset in datasets.values():
            if dataset.report.bad or dataset.report.truncated:
                log(dataset.report.summary())
        if not trainer.accelerator.is_main_process:
            break
    return trainer, results


def evaluate_trained(model, recipe: dict, evaluation: Evaluation, result) -> dict[str, Any]:
    """The trained model's figures: adapter size, accuracy with the real and a grey image, the text-only ceiling,
    and the saved adapter reloaded onto a freshly built base."""
    from peft_vlm.evaluation import vqa
    from peft_vlm.methods.summary import trainable_summary

    figures: dict[str, Any] = {
        "adapter": str(result.adapter_path), "adapter_bytes": result.adapter_path.stat().st_size,
        "trainable_parameters": trainable_summary(model).trainable_parameters,
    }
    spec = evaluation.spec
    if not evaluation.questions:
        return figures
    figures["accuracy"] = evaluation.answer(model, progress=True)
    if spec.get("grey_image"):
        figures["grey_image"] = evaluation.answer(model, replace_image=vqa.grey_image(model))
    if spec.get("format") == "easy_vqa" and spec.get("text_only_ceiling"):
        from peft_vlm.data import easy_vqa

        figures["text_only_ceiling"] = easy_vqa.text_only_ceiling()
    if spec.get("verify_reload"):
        # the shared file must be the whole story: a fresh base plus the adapter answers exactly the same (on the
        # first `verify_reload` questions, or all of them with `true`); a difference is explained or fails the run
        import contextlib

        from peft_vlm.evaluation.reload_check import check_reload
        from peft_vlm.methods.adapter_file import load_adapter

        reloaded = load_adapter(build_model(recipe.get("model") or {}), result.adapter_path)
        device = next(model.parameters()).device
        quantized = getattr(getattr(reloaded, "language_model", reloaded), "is_loaded_in_4bit", False)
        if next(reloaded.parameters()).device != device and not quantized:
            reloaded.to(device)  # answered where the trained model answers (its GPU): the same kernels
        figures["reloaded"] = evaluation.answer(reloaded, spec["verify_reload"])
        precision = model.answer_protocol.precision if model.answer_protocol else None
        figures["reload_check"] = check_reload(
            model, reloaded, evaluation.questions, figures["accuracy"], figures["reloaded"],
            lambda answering, questions: evaluation.answer(answering, questions=questions),
            "fp32" if evaluation_precision(precision) is contextlib.nullcontext else "bf16")
        figures["reload_identical"] = figures["reload_check"].identical
    return figures
