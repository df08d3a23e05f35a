"""What can be refused cheaply is refused first: a file that is no adapter from its safetensors header (no tensor
read), an empty recipe and an unknown connector before a tower is pretrained or a model loaded."""
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import peft_vlm as pv
from peft_vlm import recipes
from peft_vlm.cli import main as cli
from peft_vlm.methods import adapter_file
from peft_vlm.recipes import load_recipe

sys.path.insert(0, str(Path(__file__).parents[1] / "methods"))

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "qlora_single_gpu.yaml"


@pytest.fixture
def tensors_read(monkeypatch):
    """Records every tensor read from an adapter file."""
    reads, real_open = [], adapter_file.safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self.handle = real_open(*args, **kwargs)

        def __enter__(self):
            self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def get_tensor(self, name):
            reads.append(name)
            return self.handle.get_tensor(name)

        def __getattr__(self, name):
            return getattr(self.handle, name)

    monkeypatch.setattr(adapter_file, "safe_open", Recording)
    return reads


def test_info_refuses_a_safetensors_file_that_is_no_adapter_from_its_header_without_reading_tensors(
        tmp_path, tensors_read, capsys):
    path = tmp_path / "model.safetensors"
    save_file({f"layer{i}.weight": torch.zeros(64, 64) for i in range(8)}, str(path), metadata={"format": "pt"})
    assert cli(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert "is not a peft_vlm adapter file (format 'pt')" in err and err.count("\n") == 1
    assert tensors_read == []


def test_an_adapter_file_whose_metadata_does_not_fit_is_refused_before_its_tensors_are_read(
        vlm_factory, tmp_path, tensors_read):
    import peft

    path = pv.save_adapter(pv.apply(vlm_factory(), peft.LoraConfig(r=2, target_modules=["q_proj"])), tmp_path / "a")
    pv.methods.adapter_file.read_adapter(path)
    assert tensors_read  # a good file's tensors are read
    tensors_read.clear()
    from test_adapter_schema import rewrite

    bad = rewrite(path, tmp_path / "bad.safetensors", methods=[{"method": "lora", "config": {"r": "two"}}])
    with pytest.raises(pv.AdapterFileError, match="r='two' is not valid"):
        pv.methods.adapter_file.read_adapter(bad)
    assert tensors_read == []


@pytest.mark.parametrize("text", ["", "\n# nothing but a comment\n", "null\n", "{}\n"])
def test_an_empty_recipe_is_refused_before_anything_is_built(tmp_path, monkeypatch, capsys, text):
    monkeypatch.setattr(recipes, "build_model", lambda spec: pytest.fail("a model was built"))
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(pv.ConfigError, match=f"recipe '{path}' is empty"):
        load_recipe(path)
    assert cli(["train", str(path)]) == 2
    assert "is empty" in capsys.readouterr().err


def test_an_unknown_connector_in_a_recipe_is_refused_on_load_naming_it():
    with pytest.raises(pv.ConfigError, match="model section: unknown connector 'mlp3x'; available connectors: "):
        load_recipe(RECIPE, ["model.connector=mlp3x"])


def test_an_unknown_connector_is_refused_before_a_tower_is_pretrained_or_a_model_loaded(monkeypatch):
    from peft_vlm.embedded import models, tower_pretraining

    monkeypatch.setattr(tower_pretraining, "pretrained_tower", lambda *a, **k: pytest.fail("tower pretrained"))
    monkeypatch.setattr(models, "default_language_model_path", lambda: pytest.fail("language model prepared"))
    for vision in ("embedded", models.CONTRASTIVE_VISION):
        with pytest.raises(pv.ConfigError, match="unknown connector 'mlp3x'"):
            recipes.build_model({"vision": vision, "connector": "mlp3x"})
