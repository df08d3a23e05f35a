"""The `peft-vlm` command line: train, eval, generate, info.

    peft-vlm train recipes/llama_adapter_v2_joint.yaml [--max-steps N] [--output-dir DIR] [--set section.key=value]
    peft-vlm eval out/run/adapter.safetensors [--recipe R] [--data FILE --format llava] [--limit N] [--perplexity]
    peft-vlm generate out/run/adapter.safetensors --image cat.png --prompt "What is in the picture?"
    peft-vlm info out/run/adapter.safetensors
    peft-vlm export out/run/adapter.safetensors out/exported   (a folder plain transformers loads)

Paths may start with `~` (the home folder) even where the shell leaves it as it is (`--data=~/x.json`, quoted).

Several processes: `accelerate launch -m peft_vlm.cli train RECIPE` or `torchrun --nproc_per_node N -m peft_vlm.cli
train RECIPE`; nothing else changes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from peft_vlm.errors import PeftVlmError


def _percent(value: float) -> str:
    return f"{100 * value:5.1f}%"


def format_figures(figures: dict) -> str:
    """The end-of-run report: accuracy per question type against the grey-image, zero-shot and text-only figures."""
    lines = [f"== {figures['recipe']} =="]
    rows = [(name, figures[key]) for name, key in
            [("trained, real image", "accuracy"), ("trained, grey image", "grey_image"),
             ("adapter reloaded on a fresh base", "reloaded"), ("untouched model (zero-shot)", "zero_shot")]
            if key in figures]
    if "text_only_ceiling" in figures:
        rows.append(("text-only ceiling", figures["text_only_ceiling"]))
    if rows:
        kinds = sorted({kind for _, accuracy in rows for kind in _as_dict(accuracy)}, key=lambda k: (k != "all", k))
        lines.append(f"{'accuracy':<30}" + "".join(f"{kind:>10}" for kind in kinds))
        for name, accuracy in rows:
            values = _as_dict(accuracy)
            lines.append(f"{name:<30}" + "".join(f"{_percent(values[k]) if k in values else '-':>10}" for k in kinds))
    if "accuracy" in figures:
        lines.append(_questions_line(figures["accuracy"]))
    if "reload_identical" in figures:
        same = "identical answers" if figures["reload_identical"] else "DIFFERENT answers"
        answered, asked = figures["reloaded"].total["all"], figures["accuracy"].total["all"]
        where = "every question" if answered == asked else f"the first {answered:,} questions"
        check = figures.get("reload_check")
        lines.append(check.line(where) if check is not None else
                     f"saved adapter on a freshly loaded base: {same} on {where}")
    if "trainable_parameters" in figures:
        lines.append(f"trainable parameters: {figures['trainable_parameters']:,}")
    if "adapter" in figures:
        lines.append(f"adapter file: {figures['adapter']} ({figures['adapter_bytes'] / 1e6:.2f} MB)")
    if "train_seconds" in figures:
        lines.append(f"training time: {figures['train_seconds']:.0f} s; wall time: {figures['wall_seconds']:.0f} s")
    if "accuracy" in figures and figures["accuracy"].examples:
        lines.append("examples:")
        examples = figures["accuracy"].examples
        for question, expected, answered in examples[:: max(1, len(examples) // 3)][:3]:
            lines.append(f"  Q: {question}\n     expected: {expected}   model: {answered.strip()!r}")
    return "\n".join(lines)


def _questions_line(accuracy) -> str:
    """How many questions were scored, per type, and how many distinct inputs the model was asked for them."""
    total = accuracy.total["all"]
    kinds = ", ".join(f"{kind} {count:,}" for kind, count in sorted(accuracy.total.items()) if kind != "all")
    line = f"questions: {total:,}" + (f" (per type: {kinds})" if kinds else "")
    asked = getattr(accuracy, "asked", None)
    if asked is not None and asked != total:
        line += f"; the model was asked {asked:,} distinct ones (same image and text: one greedy answer)"
    return line


def _as_dict(accuracy) -> dict:
    return accuracy if isinstance(accuracy, dict) else accuracy.as_dict()


def _train(arguments: argparse.Namespace) -> None:
    from peft_vlm.errors import ConfigError
    from peft_vlm.recipes import load_recipe, run_recipe

    overrides = list(arguments.set or [])
    if arguments.max_steps is not None:
        overrides.append(f"train.max_steps={arguments.max_steps}")
    if arguments.output_dir is not None:
        overrides.append(f"train.output_dir={arguments.output_dir}")
    recipe = load_recipe(arguments.recipe, overrides, full=arguments.full)
    staged = [index for index, stage in enumerate(recipe.get("stages") or [])
              if "max_steps" in (stage.get("train") or {})]
    if arguments.max_steps is not None and staged:
        raise ConfigError(f"--max-steps: recipe '{arguments.recipe}' sets max_steps per stage; set each with --set "
                          f"stages.{staged[0]}.train.max_steps=N")
    figures = run_recipe(recipe)
    if "adapter" in figures:
        print(format_figures(figures))


def _model_for(adapter: str, recipe_path: str | None, overrides: list[str]):
    """A fresh base as the adapter file describes it (or as a recipe's model section says), with the adapter loaded."""
    from peft_vlm.methods.adapter_file import load_adapter, read_adapter
    from peft_vlm.errors import AdapterFileError, ConfigError
    from peft_vlm.model.weights_files import refuse_pickle_weights
    from peft_vlm.options import check_options
    from peft_vlm.recipes import ModelSection, apply_override, build_model, load_recipe

    if recipe_path:
        spec = load_recipe(recipe_path, overrides).get("model") or {}
    else:
        metadata, _ = read_adapter(adapter)
        if "base_model" not in metadata:
            raise AdapterFileError(f"'{adapter}' does not say how to build its base; pass --recipe")
        where = f"'{adapter}': metadata field 'base_model'"
        try:
            check_options(ModelSection, metadata["base_model"], where)
        except ConfigError as error:
            raise AdapterFileError(str(error)) from None
        refuse_pickle_weights(metadata["base_model"], where)  # before anything is loaded
        spec = {"model": metadata["base_model"]}
        for override in overrides:
            apply_override(spec, override)
        spec = spec["model"]
    return load_adapter(build_model(spec), adapter)


def _generate(arguments: argparse.Namespace) -> None:
    from PIL import Image

    from peft_vlm.recipes import evaluation_precision

    model = _model_for(arguments.adapter, arguments.recipe, arguments.set or [])
    try:
        image = Image.open(arguments.image).convert("RGB") if arguments.image else None
    except OSError as error:
        raise PeftVlmError(f"cannot read image '{arguments.image}': {error}") from None
    protocol = _protocol(model, arguments, plain_tokens=32)
    with evaluation_precision(protocol.precision)():
        answer = model.generate(images=[image] if image else None, prompts=[arguments.prompt], protocol=protocol)
    print(answer[0].strip())


def _protocol(model, arguments: argparse.Namespace, plain_tokens: int):
    """How to answer: the adapter's recorded protocol (or the recipe's; one plain pass of `plain_tokens` tokens
    where there is none), in one plain pass with `--plain`, in two with `--describe-first`, with `--max-new-tokens`
    tokens per answer."""
    import dataclasses

    from peft_vlm.data.answer_protocol import AnswerProtocol

    protocol = model.answer_protocol or AnswerProtocol(max_new_tokens=plain_tokens)
    if arguments.plain:
        protocol = dataclasses.replace(protocol, describe_first=False, answer_after=None)
    if getattr(arguments, "describe_first", False):
        protocol = dataclasses.replace(protocol, describe_first=True)
    if arguments.max_new_tokens is not None:
        protocol = dataclasses.replace(protocol, max_new_tokens=arguments.max_new_tokens)
    return protocol


def _eval(arguments: argparse.Namespace) -> None:
    from peft_vlm.recipes import Evaluation, answer_protocol, load_recipe
    from peft_vlm.evaluation import vqa

    model = _model_for(arguments.adapter, arguments.recipe, arguments.set or [])
    recipe = load_recipe(arguments.recipe, arguments.set or []) if arguments.recipe else {}
    if recipe:  # answered as the recipe's own evaluation answers (describe, then answer, say)
        model.answer_protocol = answer_protocol(recipe)
    if arguments.data:
        spec = {"path": arguments.data, "format": arguments.format, "limit": arguments.limit}
    elif arguments.recipe:
        spec = dict(recipe.get("eval") or {})
        spec["limit"] = arguments.limit or spec.get("limit")
    else:
        spec = {"format": "easy_vqa", "split": "test", "limit": arguments.limit}
    figures = {"recipe": f"eval {arguments.adapter}"}
    # answered the way the adapter was trained to answer, in the precision it trained in
    protocol = _protocol(model, arguments, plain_tokens=8)
    spec.setdefault("batch_size", 64)
    evaluation = Evaluation({"eval": spec, "train": recipe.get("train") or {}})  # its tower-feature cache choice
    figures["accuracy"] = evaluation.answer(model, progress=True, protocol=protocol)
    if arguments.grey_image or spec.get("grey_image"):
        figures["grey_image"] = evaluation.answer(model, replace_image=vqa.grey_image(model), protocol=protocol)
    print(f"answer protocol: {protocol.describe()}")
    print(format_figures(figures))
    if arguments.perplexity:
        from peft_vlm.data import Collator, SampleEncoder
        from peft_vlm.recipes import build_dataset

        dataset = build_dataset(spec, SampleEncoder.for_model(model), {"bad_samples": "skip"})
        examples = (dataset[i] for i in range(len(dataset) if not spec.get("limit")
                                              else min(len(dataset), spec["limit"])))
        print("loss/perplexity: " + json.dumps(vqa.perplexity(model, examples, Collator.for_model(model))))


def _info(arguments: argparse.Namespace) -> None:
    from peft_vlm.methods.adapter_file import describe_adapter

    print(describe_adapter(arguments.adapter))


def _export(arguments: argparse.Namespace) -> None:
    from peft_vlm.methods.export_transformers import export_transformers

    model = _model_for(arguments.adapter, arguments.recipe, arguments.set or [])
    print(f"exported to {export_transformers(model, arguments.output, overwrite=arguments.overwrite)}")


def _path(text: str) -> str:
    """An argparse type: a path, `~` at its start the home folder."""
    return os.path.expanduser(text)


def _positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (checked before any model is built)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-vlm",
                                     description="Parameter-efficient fine-tuning of vision-language models")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a recipe, save the adapter, evaluate")
    train.add_argument("recipe", type=_path, help="recipe YAML file (see recipes/)")
    train.add_argument("--max-steps", type=int)
    train.add_argument("--output-dir", type=_path)
    train.add_argument("--full", action="store_true", help="apply the recipe's 'full' section (train longer)")
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("eval", help="VQA accuracy (and loss/perplexity) of a saved adapter")
    evaluate.add_argument("adapter", type=_path)
    evaluate.add_argument("--recipe", type=_path, help="take the base model and the eval section from this recipe")
    evaluate.add_argument("--data", type=_path, help="a labelled data file to evaluate on (default: easy-VQA test)")
    evaluate.add_argument("--format", default="llava", help="format of --data (llava, caption, coco, alpaca)")
    evaluate.add_argument("--limit", type=_positive_int, help="evaluate on this many evenly spaced questions")
    evaluate.add_argument("--grey-image", action="store_true", help="also answer with a neutral grey image")
    evaluate.add_argument("--perplexity", action="store_true", help="also report loss and perplexity")
    evaluate.add_argument("--describe-first", action="store_true",
                          help="answer in two passes, describe the image, then answer (for adapters that record no "
                               "answer protocol)")
    evaluate.add_argument("--max-new-tokens", type=_positive_int,
                          help="tokens per answer (default: the answer protocol's)")
    evaluate.set_defaults(run=_eval)

    generate = commands.add_parser("generate", help="answer a question about an image with a saved adapter")
    generate.add_argument("adapter", type=_path)
    generate.add_argument("--image", type=_path)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--recipe", type=_path,
                          help="take the base model from this recipe instead of the adapter file")
    generate.add_argument("--max-new-tokens", type=_positive_int,
                          help="tokens per answer (default: the answer protocol's, 32 without one)")
    generate.set_defaults(run=_generate)

    info = commands.add_parser("info", help="show what an adapter file holds")
    info.add_argument("adapter", type=_path, help="adapter folder or .safetensors file")
    info.set_defaults(run=_info)

    export = commands.add_parser("export", help="write base + adapter as a folder plain transformers loads")
    export.add_argument("adapter", type=_path)
    export.add_argument("output", type=_path, help="folder to write (config, safetensors weights, processor files)")
    export.add_argument("--recipe", type=_path, help="take the base model from this recipe instead of the adapter file")
    export.add_argument("--overwrite", action="store_true",
                        help="replace OUTPUT if it is not empty (never the base model's own folder)")
    export.set_defaults(run=_export)

    for command in (train, evaluate, generate, export):
        command.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a recipe value")
    for command in (evaluate, generate):
        command.add_argument("--plain", action="store_true",
                             help="answer in one plain pass, not the way the adapter file says it was trained (e.g. "
                                  "describe the image first)")
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    from peft_vlm.runtime import quiet

    quiet.install()  # before peft is imported: one of them comes on its import
    try:
        arguments.run(arguments)
    except PeftVlmError as error:
        print(f"peft-vlm {arguments.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which stops with a checkpoint instead)
        print(f"peft-vlm {arguments.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
