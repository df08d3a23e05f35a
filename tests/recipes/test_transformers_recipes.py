"""The recipe of every wrapped transformers family trains a few steps on a tiny config of its class, through the
command line, and writes an adapter that loads back onto the wrapped base."""
import json
from pathlib import Path

import pytest
from PIL import Image

import peft_vlm as pv
from peft_vlm.cli import main as cli
from tiny_transformers_vlms import save_tiny

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
FAMILIES = {
    "transformers_llava_lora": "llava",
    "transformers_llava_next_lora": "llava_next",
    "transformers_qwen2_vl_adapter": "qwen2_vl",
    "transformers_qwen2_5_vl_expert": "qwen2_5_vl",
    "transformers_smolvlm_adapter": "idefics3",
    "transformers_paligemma_lora": "paligemma",
    "transformers_gemma3_lora": "gemma3",
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    for name, colour in [("red.png", (220, 20, 20)), ("blue.png", (20, 20, 220))]:
        Image.new("RGB", (40, 40), colour).save(folder / name)
    rows = [{"image": f"{c}.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                                    {"from": "gpt", "value": c}]} for c in ["red", "blue"] * 3]
    (folder / "llava.json").write_text(json.dumps(rows))
    return folder


@pytest.mark.parametrize("recipe", sorted(FAMILIES))
def test_family_recipe_trains_a_few_steps_on_a_tiny_config(recipe, data, tmp_path):
    base = save_tiny(FAMILIES[recipe], tmp_path / "base")
    overrides = [f"model.language_model={base}", f"data.train.path={data / 'llava.json'}", f"data.image_root={data}",
                 f"train.output_dir={tmp_path / 'out'}", "train.batch_size=2", "train.report_to=null",
                 "train.progress_bar=false", "train.checkpoint_every=0"]
    assert cli(["train", str(RECIPES / f"{recipe}.yaml"), "--max-steps", "2",
                *[item for o in overrides for item in ("--set", o)]]) == 0
    adapter = tmp_path / "out" / "adapter.safetensors"
    assert adapter.is_file()
    from peft_vlm.methods.adapter_file import read_adapter
    from peft_vlm.recipes import build_model

    spec = read_adapter(adapter)[0]["base_model"]  # how the adapter says its base is rebuilt
    assert spec["language_model"] == base
    trained = pv.load_adapter(build_model(spec), adapter)
    assert trained.architecture == FAMILIES[recipe]
    assert any(p.requires_grad for p in trained.parameters())


def test_bad_rows_through_a_wrapped_models_processor_are_reported_by_file_and_row(data, tmp_path):
    from peft_vlm.data import SampleEncoder, read_dataset

    rows = json.loads((data / "llava.json").read_text())[:2]
    rows[1] = {"image": "missing.png", "conversations": rows[0]["conversations"]}
    (tmp_path / "bad.json").write_text(json.dumps(rows))
    model = pv.VisionLanguageModel.from_pretrained(save_tiny("qwen2_vl", tmp_path / "base"))
    encoder = SampleEncoder.for_model(model)
    samples = list(read_dataset(str(tmp_path / "bad.json"), "llava", image_root=str(data)))
    example = encoder(samples[0])
    assert example["labels"].ne(-100).sum() > 0 and "image_grid_thw" in example
    with pytest.raises(pv.DataError, match=r"bad\.json:row 2: missing image file .*missing\.png"):
        encoder(samples[1])
