"""The package's layering, as docs/architecture.md states it: a module imports only from its own
layer or the layers below (lazy imports inside functions included), so there is no import circle between layers and
no import that runs back up; the core (runtime, data, model) never imports a method, the evaluation package or the
embedded default."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "peft_vlm"
FOUNDATION = {"errors", "options", "version"}  # one layer of three modules
LAYERS = {  # rank: a module may import modules of a lower rank, and of its own layer
    "foundation": 0, "runtime": 1, "data": 2, "model": 3, "methods": 4,
    "training": 5, "evaluation": 5, "embedded": 6, "recipes": 7, "cli": 8, "__init__": 9,
}


def layer_of(module: str) -> str:
    parts = module.split(".")
    layer = parts[1] if len(parts) > 1 else "__init__"
    return "foundation" if layer in FOUNDATION else layer


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("peft_vlm"):
            found |= {node.module} if node.module != "peft_vlm" else {f"peft_vlm.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("peft_vlm.")}
    return found


def test_every_import_stays_in_its_layer_or_goes_down():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(("peft_vlm", *path.relative_to(PACKAGE).with_suffix("").parts))
        layer = layer_of(module) if path.name != "__init__.py" or path.parent != PACKAGE else "__init__"
        for imported in imports_of(path):
            target = layer_of(imported)
            same = target == layer
            if not same and (target not in LAYERS or LAYERS[target] >= LAYERS[layer]):
                wrong.append(f"{module} ({layer}) imports {imported} ({target})")
    assert wrong == []


def test_the_layer_list_names_every_part_of_the_package():
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if p.suffix == ".py" or (p / "__init__.py").exists()}
    assert {"foundation" if part in FOUNDATION else part for part in parts} == set(LAYERS)
