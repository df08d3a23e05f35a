"""A model card beside every adapter: `README.md` in huggingface_hub's `ModelCard` format, as peft writes one.

Everything on it is read back from the adapter file (base, fingerprint, methods and their trainable parameters,
training data and steps, answer protocol), plus the evaluation figures of `metrics.json` beside it when there are
some, so the card, `peft-vlm info` and the file can never disagree.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from peft_vlm.methods.adapter_file import ADAPTER_FILE_NAME, adapter_facts
from peft_vlm.model.vision_language_model import HUB_IDS

CARD_NAME = "README.md"
DEFAULT_OPTIONS = {"connector": "mlp2x_gelu", "load_in_4bit": False, "vision_pretrained": None, "resize": "resize"}


def load_snippet(base_model: dict | None, folder: Path) -> str:
    """Three lines of Python that rebuild the base and load the adapter."""
    spec = {key: value for key, value in (base_model or {}).items() if DEFAULT_OPTIONS.get(key, 0) != value}
    language_model = spec.pop("language_model", "path/to/language-model")
    arguments = "".join(f", {key}={value!r}" for key, value in spec.items() if key != "resize")
    return (f"import peft_vlm as pv\n"
            f"model = pv.VisionLanguageModel.from_pretrained({language_model!r}{arguments})\n"
            f"model = pv.load_adapter(model, {str(folder)!r})")


def evaluation_table(metrics: dict[str, Any]) -> list[str]:
    """Markdown rows of every accuracy figure (a mapping of question type to share)."""
    rows = {name: value for name, value in metrics.items()
            if isinstance(value, dict) and value and all(isinstance(v, (int, float)) for v in value.values())}
    if not rows:
        return []
    kinds = sorted({kind for value in rows.values() for kind in value}, key=lambda kind: (kind != "all", kind))
    lines = ["| figure | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    for name, value in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * value[k]:.1f}%" if k in value else "-" for k in kinds) + " |")
    return lines


def model_card(adapter_file: str | Path, metrics: dict[str, Any] | None = None) -> ModelCard:
    facts = adapter_facts(adapter_file)
    metrics = metrics if metrics is not None else facts["metrics"]
    base_model = facts["base_model"] or {}
    name = base_model.get("language_model")
    data = ModelCardData(  # a local folder is no base_model the hub could link to
        base_model=HUB_IDS.get(name, name) if isinstance(name, str) and not Path(name).is_absolute() else None,
        library_name="peft_vlm",
        tags=["peft_vlm", "vision-language", "adapter", *facts["methods"]],
    )
    training = facts["training"] or {}
    lines = [
        f"# {facts['file'].parent.name}", "",
        "A peft_vlm adapter: only the parameters its methods added or unfroze, over a frozen base.", "",
        "## Base model", "",
        f"- build: `{json.dumps(base_model, sort_keys=True)}`" if base_model else "- build: not recorded",
        f"- fingerprint: `{json.dumps(facts['fingerprint'], sort_keys=True)}`", "",
        "## Methods", "", "| method/group | trainable parameters |", "|---|---|",
        *[f"| {owner} | {count:,} |" for owner, count in facts["parameters"].items()],
        f"| total | {sum(facts['parameters'].values()):,} |", "",
        "## Training", "",
        f"- data: {json.dumps(training.get('data'), sort_keys=True) if training else 'not recorded'}",
        f"- steps: {training.get('steps', 'not recorded')}", "",
        "## Answer protocol", "", facts["answer_protocol"], "",
    ]
    table = evaluation_table(metrics or {})
    if table:
        lines += ["## Evaluation", "", *table, ""]
    lines += ["## Load", "", "```python", load_snippet(base_model, facts["file"].parent), "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def card_path(adapter_file: str | Path) -> Path:
    """`README.md` in an adapter's folder; `NAME.md` beside an adapter saved as `NAME.safetensors`, which may share
    its folder with other files (a project's own README.md)."""
    adapter_file = Path(adapter_file)
    return adapter_file.with_name(CARD_NAME if adapter_file.name == ADAPTER_FILE_NAME else f"{adapter_file.stem}.md")


def write_model_card(adapter_file: str | Path, metrics: dict[str, Any] | None = None) -> Path:
    """The model card beside the adapter file (`card_path`); returns its path."""
    path = card_path(adapter_file)
    model_card(adapter_file, metrics).save(path)
    return path
