"""`peft-vlm eval` on wrapped transformers VLMs: questions go through the model's processor, and every figure it
prints is the share of answers that match, recomputed here from the model's own greedy generations."""
import json
import re

import peft
import pytest
import torch

import peft_vlm as pv
from peft_vlm.cli import main
from peft_vlm.evaluation.vqa import grey_image, normalize_answer
from tiny_transformers_vlms import pictures, save_tiny

QUESTIONS = [("What colour is the shape?", "colour"), ("What is in the picture?", "colour"),
             ("Is there a shape?", "shape"), ("Describe the image.", "shape"), ("What shape is it?", "shape")]


def trained_adapter(arch, tmp_path):
    base = pv.VisionLanguageModel.from_pretrained(save_tiny(arch, tmp_path / "base"))
    pv.apply(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for parameter in (p for p in base.parameters() if p.requires_grad):
            parameter.add_(0.1 * torch.randn_like(parameter))
    pv.save_adapter(base, tmp_path / "adapter")
    return pv.load_adapter(pv.VisionLanguageModel.from_pretrained(tmp_path / "base"), tmp_path / "adapter").eval()


def data_file(model, tmp_path):
    """A LLaVA-format file whose expected answers are the model's own answer for the first question of each type
    and a wrong one for the rest: the figures it must report are known in advance."""
    paths = []
    for index, picture in enumerate(pictures(len(QUESTIONS))):
        paths.append(tmp_path / f"q{index}.png")
        picture.save(paths[-1])
    answers = model.generate(images=[str(p) for p in paths], prompts=[q for q, _ in QUESTIONS], max_new_tokens=8)
    seen, rows = set(), []
    for path, (question, kind), answer in zip(paths, QUESTIONS, answers):
        expected = answer if kind not in seen and normalize_answer(answer) else "zebra crossing"
        seen.add(kind)
        rows.append({"image": path.name, "type": kind, "conversations": [
            {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": expected}]})
    (tmp_path / "eval.json").write_text(json.dumps(rows))
    return rows


def reported(output: str, row: str) -> dict:
    header = next(line for line in output.splitlines() if line.startswith("accuracy")).split()[1:]
    line = next(line for line in output.splitlines() if line.startswith(row))
    values = re.findall(r"(\d+\.\d)%", line[len(row):])
    return {kind: float(value) for kind, value in zip(header, values)}


def shares(rows, answers) -> dict:
    hits = {}
    for row, answer in zip(rows, answers):
        hit = normalize_answer(answer) == normalize_answer(row["conversations"][1]["value"])
        for kind in ("all", row["type"]):
            hits.setdefault(kind, []).append(hit)
    return {kind: round(100 * sum(h) / len(h), 1) for kind, h in hits.items()}


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_cli_eval_of_a_wrapped_model_reports_per_type_and_grey_image_accuracy_from_its_generations(
        arch, tmp_path, capsys):
    model = trained_adapter(arch, tmp_path)
    rows = data_file(model, tmp_path)
    assert main(["eval", str(tmp_path / "adapter"), "--data", str(tmp_path / "eval.json"), "--grey-image"]) == 0
    output = capsys.readouterr().out
    questions = [row["conversations"][0]["value"].replace("<image>", "").strip() for row in rows]
    real = model.generate(images=[str(tmp_path / r["image"]) for r in rows], prompts=questions, max_new_tokens=8)
    grey = model.generate(images=[grey_image(model)] * len(rows), prompts=questions, max_new_tokens=8)
    expected_real = shares(rows, real)
    assert reported(output, "trained, real image") == expected_real
    assert expected_real["colour"] == 50.0 and expected_real["shape"] == pytest.approx(33.3)  # the answers planted
    assert reported(output, "trained, grey image") == shares(rows, grey)
    assert "questions: 5 (per type: colour 2, shape 3)" in output


def test_recipe_eval_section_with_grey_image_runs_on_a_wrapped_model(tmp_path, capsys):
    model = trained_adapter("qwen2_vl", tmp_path)
    rows = data_file(model, tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"model": {"language_model": str(tmp_path / "base")},
                                  "eval": {"format": "llava", "path": str(tmp_path / "eval.json"),
                                           "grey_image": True}}))
    assert main(["eval", str(tmp_path / "adapter"), "--recipe", str(recipe)]) == 0
    output = capsys.readouterr().out
    questions = [row["conversations"][0]["value"].replace("<image>", "").strip() for row in rows]
    grey = model.generate(images=[grey_image(model)] * len(rows), prompts=questions, max_new_tokens=8)
    assert reported(output, "trained, grey image") == shares(rows, grey)
    assert reported(output, "trained, real image")["colour"] == 50.0


def test_recipe_eval_takes_the_recipes_choice_for_tower_features(tmp_path, monkeypatch):
    from peft_vlm.evaluation import vqa

    data_file(trained_adapter("qwen2_vl", tmp_path), tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"model": {"language_model": str(tmp_path / "base")},
                                  "train": {"cache_vision_features": False},
                                  "eval": {"format": "llava", "path": str(tmp_path / "eval.json")}}))
    asked = []
    answer = vqa.vqa_accuracy
    monkeypatch.setattr(vqa, "vqa_accuracy", lambda *a, **options: asked.append(options) or answer(*a, **options))
    assert main(["eval", str(tmp_path / "adapter"), "--recipe", str(recipe)]) == 0
    assert asked and all(options["cache_vision_features"] is False for options in asked)
