"""The embedded default by name: `VisionLanguageModel.from_pretrained("embedded")` builds, offline, the base a recipe
with `language_model: embedded` builds, and adapters saved from Python name it portably."""
import json

import pytest
import torch
from safetensors import safe_open

import peft_vlm as pv
from peft_vlm.cli import main
from peft_vlm.embedded.models import CACHE_NAME
from peft_vlm.embedded.tower_pretraining import PRETRAINED_VISION, pretrained_tower
from peft_vlm.methods.adapter_file import adapter_metadata, fingerprint, write_adapter
from peft_vlm.recipes import build_model
from peft_vlm.runtime.tracking import named_tracked_parameters

pytestmark = pytest.mark.real_model
RECIPE_MODEL = {"language_model": "embedded", "vision": "embedded_contrastive", "vision_options": {"tokens": "pooled"},
                "use_chat_template": False}


@pytest.fixture(scope="module")
def by_name():
    torch.manual_seed(0)
    return pv.VisionLanguageModel.from_pretrained("embedded", vision_options={"tokens": "pooled"},
                                                  use_chat_template=False)


def test_embedded_by_name_builds_the_same_base_as_the_recipe_route(by_name):
    torch.manual_seed(0)
    recipe_built = build_model(RECIPE_MODEL)
    assert fingerprint(by_name) == fingerprint(recipe_built)
    assert by_name.base_spec() == recipe_built.base_spec()
    assert torch.equal(next(by_name.connector.parameters()), next(recipe_built.connector.parameters()))


def test_embedded_by_name_takes_the_contrastive_tower_unless_a_vision_is_named(by_name):
    assert by_name.vision_tower.description["open_clip"] == PRETRAINED_VISION
    named = pv.VisionLanguageModel.from_pretrained("embedded", vision="embedded_contrastive",
                                                   vision_options={"tokens": "pooled"})
    assert named.vision_tower.description == by_name.vision_tower.description
    assert pv.VisionLanguageModel.from_pretrained("embedded", vision="embedded").vision_tower.description[
        "pretrained"] is None


def test_base_spec_names_the_embedded_default_portably(by_name):
    spec = by_name.base_spec()
    assert (spec["language_model"], spec["vision"], spec["vision_pretrained"]) == (
        "embedded", "embedded_contrastive", None)
    assert "/" not in json.dumps(spec)


def _adapter(model, tmp_path):
    pv.apply(model, pv.BiasScaleConfig())
    return pv.save_adapter(model, tmp_path / "adapter")


def test_generate_command_answers_with_an_adapter_trained_in_python(by_name, tmp_path, capsys):
    model = pv.VisionLanguageModel.from_pretrained("embedded")
    path = _adapter(model, tmp_path)
    with safe_open(str(path), framework="pt") as handle:
        assert json.loads(handle.metadata()["base_model"])["language_model"] == "embedded"
    assert main(["generate", str(path), "--prompt", "What colour is the sky?", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.strip()


def test_adapter_that_names_another_machines_cache_paths_still_loads(tmp_path, capsys):
    model = pv.VisionLanguageModel.from_pretrained("embedded")
    pv.apply(model, pv.BiasScaleConfig())
    metadata = adapter_metadata(model)
    spec = json.loads(metadata["base_model"])
    tower_file = pretrained_tower().rsplit("/", 1)[-1]
    spec.update(language_model=f"/home/someone/.cache/peft_vlm/{CACHE_NAME}", vision=PRETRAINED_VISION,
                vision_pretrained=f"/home/someone/.cache/peft_vlm/towers/{tower_file}")
    tensors = {name: parameter for name, (parameter, _, _) in named_tracked_parameters(model).items()}
    path = write_adapter(tmp_path / "old", tensors, {**metadata, "base_model": json.dumps(spec)})
    assert main(["generate", str(path), "--prompt", "Hello", "--max-new-tokens", "2"]) == 0


def test_the_model_card_names_the_embedded_default_by_its_hub_id(by_name, tmp_path):
    from huggingface_hub import ModelCard

    model = pv.VisionLanguageModel.from_pretrained("embedded")
    _adapter(model, tmp_path)
    card = ModelCard.load(tmp_path / "adapter" / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "pv.VisionLanguageModel.from_pretrained('embedded', vision='embedded_contrastive'" in card.text
