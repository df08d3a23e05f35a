"""Every recipe runs a few steps on tiny models, through the command line, so none of them rots."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import peft_vlm as pv
from peft_vlm.cli import main as cli
from peft_vlm.recipes import apply_override, build_model, load_recipe, stages

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@pytest.fixture
def tiny_files(tmp_path, tokenizer, lm_factory):
    """A tiny LM folder and small data files in each format, with two images."""
    lm = tmp_path / "lm"
    lm_factory().save_pretrained(lm)
    tokenizer.save_pretrained(lm)
    for name, colour in [("red.png", (220, 20, 20)), ("blue.png", (20, 20, 220))]:
        Image.new("RGB", (40, 40), colour).save(tmp_path / name)
    conversations = [{"image": f"{c}.png",
                      "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                    {"from": "gpt", "value": c}]}
                     for c in ["red", "blue"] * 3]
    (tmp_path / "llava.json").write_text(json.dumps(conversations))
    (tmp_path / "captions.jsonl").write_text("".join(
        json.dumps({"image": f"{c}.png", "caption": f"A {c} square."}) + "\n" for c in ["red", "blue"] * 3))
    alpaca = [{"instruction": "Name a colour.", "input": "", "output": c} for c in ["red", "blue"] * 3]
    (tmp_path / "alpaca.json").write_text(json.dumps(alpaca))
    return tmp_path


def tiny_overrides(tmp_path, tiny_vit, *extra):
    common = [f"model.language_model={tmp_path / 'lm'}", f"model.vision={tiny_vit}",
              f"train.output_dir={tmp_path / 'out'}",
              "train.batch_size=2", "train.report_to=null", "train.progress_bar=false", "train.checkpoint_every=0"]
    return [item for override in [*common, *extra] for item in ("--set", override)]


RUNS = {
    "llama_adapter_v1": [],
    "llama_adapter_v2_joint": ["eval.limit=3", "eval.zero_shot=false", "data.max_length=null"],
    "llava_lora": [],
    "cogvlm_expert": [],
    "qlora_single_gpu": [],
}
DATA = {
    "llama_adapter_v1": ["data.train.path={d}/alpaca.json"],
    "llava_lora": ["stages.0.data.train.path={d}/captions.jsonl", "stages.1.data.train.path={d}/llava.json",
                   "data.image_root={d}", "stages.1.methods.0.r=4"],
    "cogvlm_expert": ["data.train.path={d}/llava.json", "data.image_root={d}"],
    "qlora_single_gpu": ["data.train.path={d}/llava.json", "data.image_root={d}", "methods.0.r=4"],
    "llama_adapter_v2_joint": [],
}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_every_recipe_trains_a_few_steps_and_writes_an_adapter(name, tiny_files, tiny_vit, capsys):
    extra = [*RUNS[name], *(item.format(d=tiny_files) for item in DATA[name])]
    assert cli(["train", str(RECIPES / f"{name}.yaml"), "--max-steps", "2",
                *tiny_overrides(tiny_files, tiny_vit, *extra)]) == 0
    out = capsys.readouterr().out
    adapter = tiny_files / "out" / ("finetune/adapter.safetensors" if name == "llava_lora" else "adapter.safetensors")
    assert adapter.is_file() and "trainable parameters" in out
    metadata, tensors = pv.methods.adapter_file.read_adapter(adapter)
    assert tensors and metadata["base_model"]["vision"] == tiny_vit


def test_a_recipe_gives_the_same_adapter_whatever_the_process_drew_before(tiny_files, tiny_vit, capsys):
    extra = [item.format(d=tiny_files) for item in DATA["llama_adapter_v1"]]
    adapters = []
    for run, draws in enumerate([0, 1000]):
        torch.rand(draws)  # e.g. a vision tower pretrained on first use, or another recipe, ran before
        overrides = tiny_overrides(tiny_files, tiny_vit, *extra, f"train.output_dir={tiny_files / f'run{run}'}")
        assert cli(["train", str(RECIPES / "llama_adapter_v1.yaml"), "--max-steps", "1", *overrides]) == 0
        adapters.append(pv.methods.adapter_file.read_adapter(tiny_files / f"run{run}" / "adapter.safetensors")[1])
    capsys.readouterr()
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][name], adapters[1][name]) for name in adapters[0])


def test_joint_recipe_reports_accuracy_with_real_and_grey_images(tiny_files, tiny_vit, capsys):
    recipe = str(RECIPES / "llama_adapter_v2_joint.yaml")
    cli(["train", recipe, "--max-steps", "2",
         *tiny_overrides(tiny_files, tiny_vit, "eval.limit=6", "eval.zero_shot=true")])
    out = capsys.readouterr().out
    for row in ("trained, real image", "trained, grey image", "untouched model (zero-shot)", "text-only ceiling",
                "adapter reloaded on a fresh base"):
        assert row in out
    assert "saved adapter on a freshly loaded base: identical answers on every question" in out
    assert "yes/no" in out and "examples:" in out


def test_generate_and_eval_commands_rebuild_the_base_from_the_adapter(tiny_files, tiny_vit, capsys):
    recipe = str(RECIPES / "llava_lora.yaml")
    overrides = tiny_overrides(tiny_files, tiny_vit, "stages=null", "methods=[lora]",
                               f"data.train.path={tiny_files}/llava.json",
                               f"data.image_root={tiny_files}", "data.train.format=llava")
    assert cli(["train", recipe, "--max-steps", "1", *overrides]) == 0
    adapter = str(tiny_files / "out" / "adapter.safetensors")
    capsys.readouterr()
    base = ["--set", f"model.language_model={tiny_files / 'lm'}"]
    assert cli(["generate", adapter, "--image", str(tiny_files / "red.png"), "--prompt", "What colour?",
                "--max-new-tokens", "3", *base]) == 0
    assert capsys.readouterr().out.strip()
    assert cli(["eval", adapter, "--data", str(tiny_files / "llava.json"), "--limit", "2", "--perplexity", *base]) == 0
    out = capsys.readouterr().out
    assert "trained, real image" in out and "perplexity" in out


def test_bad_recipe_inputs_are_one_line_errors(tiny_files, capsys):
    assert cli(["train", str(tiny_files / "missing.yaml")]) == 2
    assert "no recipe file at" in capsys.readouterr().err
    (tiny_files / "bad.yaml").write_text("model: {}\nmystery: 1\n")
    assert cli(["train", str(tiny_files / "bad.yaml")]) == 2
    assert "unknown section(s) mystery" in capsys.readouterr().err
    (tiny_files / "bad2.yaml").write_text("train: {max_stepz: 3}\n")
    with pytest.raises(pv.ConfigError, match="unknown training option.*max_stepz"):
        load_recipe(tiny_files / "bad2.yaml")  # refused on load, before any model is built
    with pytest.raises(pv.ConfigError, match="unknown training option.*max_stepz"):
        pv.TrainConfig.from_dict({"max_stepz": 3})
    with pytest.raises(pv.ConfigError, match="vision: fused towers.*'embedded_contrastive'"):
        build_model({"vision": ["embedded", "embedded_contrastive"]})


def test_overrides_reach_nested_sections_and_list_items():
    recipe = {"stages": [{"train": {}}, {"train": {}}], "train": {"max_steps": 5}}
    apply_override(recipe, "stages.1.train.learning_rate=1e-4")
    apply_override(recipe, "train.max_steps=7")
    assert recipe["stages"][1]["train"]["learning_rate"] == 1e-4 and recipe["train"]["max_steps"] == 7
    with pytest.raises(pv.ConfigError, match="section.key=value"):
        apply_override(recipe, "train.max_steps")


def test_two_stage_recipe_adds_methods_per_stage_and_replaces_data_streams():
    recipe = load_recipe(RECIPES / "llava_lora.yaml")
    align, finetune = stages(recipe)
    assert align["methods"] == [] and finetune["methods"][0]["method"] == "lora"
    assert align["data"]["train"]["format"] == "caption" and finetune["data"]["train"]["format"] == "llava"
    assert finetune["train"]["learning_rate"] == 2e-4 and finetune["train"]["batch_size"] == 16


def test_joint_recipe_draws_accuracy_against_steps_and_checks_the_reload_on_the_first_questions(
        tiny_files, tiny_vit, capsys):
    recipe = str(RECIPES / "llama_adapter_v2_joint.yaml")
    overrides = tiny_overrides(tiny_files, tiny_vit, "eval.limit=6", "eval.zero_shot=2", "eval.verify_reload=4",
                               "eval.curve={every: 2, per_type: 1}", "train.mixed_precision=bf16")
    assert cli(["train", recipe, "--max-steps", "3", *overrides]) == 0
    out = capsys.readouterr().out
    assert "identical answers on the first 4 questions" in out and "questions: 6 (per type:" in out
    points = json.loads((tiny_files / "out" / "accuracy_curve.json").read_text())
    assert [(p["step"], p["image"]) for p in points] == [
        (step, image) for step in (0, 2, 3) for image in ("real", "grey")]
    assert all(set(p) >= {"color", "shape", "yes/no"} for p in points)
    assert (tiny_files / "out" / "accuracy_curve.png").stat().st_size > 1000


def test_an_adapter_answers_as_it_was_trained_with_or_without_its_recipe(tiny_files, tiny_vit, monkeypatch, capsys):
    """An adapter trained to describe, then answer, records that protocol: `peft-vlm eval ADAPTER` alone asks the
    same prompts and gives the same figures as `--recipe`, `peft-vlm info` shows it, `--plain` answers in one pass."""
    from peft_vlm.data.formats import CAPTION_PROMPT

    recipe = str(RECIPES / "llama_adapter_v2_joint.yaml")
    overrides = tiny_overrides(tiny_files, tiny_vit, "eval.limit=4", "eval.zero_shot=false",
                               "eval.verify_reload=false", "eval.curve=null")
    assert cli(["train", recipe, "--max-steps", "1", *overrides]) == 0
    asked = []
    original = pv.VisionLanguageModel.generate

    def generate(self, images=None, prompts=(), **options):
        asked.append(list(prompts))
        return original(self, images=images, prompts=prompts, **options)

    monkeypatch.setattr(pv.VisionLanguageModel, "generate", generate)
    adapter = str(tiny_files / "out" / "adapter.safetensors")
    base = ["--set", f"model.language_model={tiny_files / 'lm'}", "--set", f"model.vision={tiny_vit}"]

    def figures(out):
        return [line for line in out.splitlines() if line.startswith(("trained,", "questions:", "answer protocol"))]

    capsys.readouterr()
    assert cli(["eval", adapter, "--recipe", recipe, "--limit", "4", *base]) == 0
    with_recipe, asked_with_recipe = figures(capsys.readouterr().out), list(asked)
    assert any(set(batch) == {CAPTION_PROMPT} for batch in asked)  # describe, then answer
    assert "trained, grey image" in with_recipe[2]  # the recipe's grey_image
    asked.clear()
    assert cli(["eval", adapter, "--limit", "4", "--grey-image", *base]) == 0
    assert figures(capsys.readouterr().out) == with_recipe and asked == asked_with_recipe
    assert with_recipe[0].startswith("answer protocol: two passes: describe ('Describe the image briefly.'")

    asked.clear()
    assert cli(["eval", adapter, "--limit", "4", "--plain", *base]) == 0
    assert all(CAPTION_PROMPT not in batch for batch in asked)
    assert "answer protocol: one pass" in capsys.readouterr().out
    assert cli(["info", adapter]) == 0
    assert "answer protocol: two passes" in capsys.readouterr().out


EASY_VQA = sorted((RECIPES / "easy_vqa").glob("*.yaml"))


@pytest.mark.parametrize("path", EASY_VQA, ids=[p.stem for p in EASY_VQA])
def test_every_easy_vqa_method_recipe_validates_and_records_its_answer_protocol(path):
    from peft_vlm.recipes import answer_protocol

    recipe = load_recipe(path)
    assert recipe["name"] == f"easy_vqa_{path.stem}"
    # these describe, then answer; the others answer in one pass
    two_passes = path.stem.startswith(("llama_adapter_v2", "qlora")) and not path.stem.endswith("one_pass")
    assert answer_protocol(recipe).describe_first == two_passes


@pytest.mark.parametrize("name", ["llava_lora", "cogvlm_expert"])
def test_one_pass_recipes_train_their_curriculum_and_answer_in_one_pass(name, tiny_files, tiny_vit, capsys):
    recipe = str(RECIPES / "easy_vqa" / f"{name}.yaml")
    overrides = tiny_overrides(tiny_files, tiny_vit, "stages.0.train.max_steps=1", "stages.1.train.max_steps=1",
                               "eval.limit=3", "eval.verify_reload=3", "eval.curve=null")
    assert cli(["train", recipe, "--max-steps", "2", *overrides]) == 2  # steps are set per stage
    assert "sets max_steps per stage" in capsys.readouterr().err
    assert cli(["train", recipe, *overrides]) == 0
    assert "identical answers on every question" in capsys.readouterr().out
    metrics = json.loads((tiny_files / "out" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["answer_protocol"]["describe_first"] is False
    assert set(metrics["accuracy"]) >= {"all"} and metrics["trainable_parameters"] > 0
    _, tensors = pv.methods.adapter_file.read_adapter(tiny_files / "out" / "all_questions" / "adapter.safetensors")
    assert any("lora" in name for name in tensors)
