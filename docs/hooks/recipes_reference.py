"""Writes the recipes reference page at build time from the dataclasses that validate a recipe."""
from __future__ import annotations

import dataclasses
import inspect
import typing

from mkdocs.structure.files import File

PAGE = "recipes-reference.md"


def _comments(cls) -> dict[str, str]:
    """{field: the comment on its line, or the comment lines right above it} from the class's source."""
    found, above = {}, []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# "))
            continue
        name = stripped.split(":", 1)[0]
        if ":" in stripped and name.isidentifier():
            found[name] = stripped.split("#", 1)[1].strip() if "  # " in stripped else " ".join(above)
        above = []
    return found


def _default(field) -> str:
    if field.default is not dataclasses.MISSING:
        return repr(field.default)
    if field.default_factory is not dataclasses.MISSING:
        return repr(field.default_factory())
    return ""


def _table(cls) -> str:
    from peft_vlm.options import describe

    hints, notes = typing.get_type_hints(cls), _comments(cls)
    rows = ["| option | type | default | notes |", "|---|---|---|---|"]
    for field in dataclasses.fields(cls):
        note = notes.get(field.name, "")
        if "at_least" in field.metadata:
            note = f"at least {field.metadata['at_least']}. {note}".strip()
        rows.append(f"| `{field.name}` | {describe(hints[field.name])} | `{_default(field)}` | "
                    f"{note.replace('|', '/')} |")
    return "\n".join(rows)


def page() -> str:
    from peft_vlm import recipes
    from peft_vlm.training.config import TrainConfig

    sections = [("model", recipes.ModelSection), ("data", recipes.DataSection),
                ("data.train / data.captions / data.instructions", recipes.StreamSection),
                ("train", TrainConfig), ("stages (each entry)", recipes.StageSection), ("eval", recipes.EvalSection)]
    text = ["# Recipes reference", "",
            "Generated when the docs are built from the dataclasses that `peft_vlm.recipes.validate_recipe` checks "
            "a recipe against; every option is validated (type, range, unknown keys) before a model is built.", "",
            f"Sections: {', '.join(f'`{name}`' for name in recipes.SECTIONS)}.", "",
            "```", inspect.getdoc(recipes).split("\n\n", 1)[1], "```", ""]
    for name, cls in sections:
        text += [f"## `{name}`", "", _table(cls), ""]
    return "\n".join(text)


def on_files(files, config):
    files.append(File.generated(config, PAGE, content=page()))
    return files
