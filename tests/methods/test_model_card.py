"""A model card (README.md, huggingface_hub's ModelCard format) beside every adapter, and `peft-vlm info` saying the
same: base, methods with trainable counts, data and steps, answer protocol, evaluation figures, how to load it."""
import json
import os
import stat
from pathlib import Path

import yaml
from huggingface_hub import ModelCard
from PIL import Image

import peft_vlm as pv
from peft_vlm.cli import main
from peft_vlm.data import SampleDataset, SampleEncoder
from peft_vlm.data.formats import SampleList

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _mode(path: Path) -> int:
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    return stat.S_IMODE(path.stat().st_mode)


def test_save_adapter_writes_a_model_card_beside_the_adapter(vlm_factory, tmp_path):
    model = pv.apply(vlm_factory(), pv.BiasScaleConfig())
    path = pv.save_adapter(model, tmp_path / "adapter")
    card = ModelCard.load(tmp_path / "adapter" / "README.md")
    assert card.data.library_name == "peft_vlm"
    assert "bias_scale" in card.data.tags and "peft_vlm" in card.data.tags
    total = pv.trainable_summary(model).trainable_parameters
    assert f"| total | {total:,} |" in card.text
    assert "## Answer protocol" in card.text and "## Base model" in card.text and "fingerprint" in card.text
    assert f"model = pv.load_adapter(model, '{path.parent}')" in card.text
    _mode(path), _mode(tmp_path / "adapter" / "README.md")


def test_trainer_records_data_and_steps_in_the_adapter_its_card_and_info(vlm_factory, tmp_path, capsys):
    model = pv.apply(vlm_factory(), pv.BiasScaleConfig())
    image = Image.new("RGB", (32, 32), (200, 10, 10))
    samples = [{"messages": [{"role": "user", "content": "<image>\nColour?"}, {"role": "assistant", "content": "red"}],
                "images": [image], "source": f"mem:{i}"} for i in range(4)]
    dataset = SampleDataset(SampleList(samples), SampleEncoder.for_model(model))
    config = pv.TrainConfig(output_dir=str(tmp_path / "run"), max_steps=2, batch_size=2, report_to=None,
                            progress_bar=False, checkpoint_every=0)
    result = pv.JointTrainer(model, config, data=dataset).train()
    card = ModelCard.load(tmp_path / "run" / "README.md")
    assert "- steps: 2" in card.text and '"rows": 4' in card.text
    assert main(["info", str(result.adapter_path)]) == 0
    info = capsys.readouterr().out
    assert "steps: 2" in info and '"rows": 4' in info and "base model:" in info and "answer protocol:" in info


def test_a_recipe_run_leaves_its_recipe_metrics_and_an_evaluation_table_beside_the_adapter(
        tmp_path, tokenizer, lm_factory, tiny_vit, capsys):
    lm = tmp_path / "lm"
    lm_factory().save_pretrained(lm)
    tokenizer.save_pretrained(lm)
    overrides = [f"model.language_model={lm}", f"model.vision={tiny_vit}", f"train.output_dir={tmp_path / 'out'}",
                 "train.batch_size=2", "train.report_to=null", "train.progress_bar=false", "train.checkpoint_every=0",
                 "eval.limit=3", "eval.zero_shot=false", "eval.curve=null", "eval.verify_reload=false",
                 "data.max_length=null"]
    assert main(["train", str(RECIPES / "llama_adapter_v2_joint.yaml"), "--max-steps", "2",
                 *[item for override in overrides for item in ("--set", override)]]) == 0
    out = tmp_path / "out"
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["train"]["max_steps"] == 2 and recipe["model"]["language_model"] == str(lm)
    metrics = json.loads((out / "metrics.json").read_text())
    card = ModelCard.load(out / "README.md")
    assert "## Evaluation" in card.text and f"{100 * metrics['accuracy']['all']:.1f}%" in card.text
    assert "two passes" in card.text  # the recipe's answer protocol: describe, then answer
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "metrics:" in info and "steps: 2" in info
    _mode(out / "recipe.yaml"), _mode(out / "metrics.json")


def test_an_adapter_saved_under_a_file_name_gets_a_card_of_that_name_and_leaves_readme_alone(vlm_factory, tmp_path):
    (tmp_path / "README.md").write_text("a project's own readme")
    model = pv.apply(vlm_factory(), pv.BiasScaleConfig())
    pv.save_adapter(model, tmp_path / "mine.safetensors")
    assert ModelCard.load(tmp_path / "mine.md").data.library_name == "peft_vlm"
    assert (tmp_path / "README.md").read_text() == "a project's own readme"
