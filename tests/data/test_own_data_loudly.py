"""Own data to answers, loudly: a run on a LLaVA-format file trains and answers in the trained format; a run that
skips too many rows, or loses a whole batch, stops with the skip report; a stream or stage removed with --set that
leaves a trainable group without data is an error."""
import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

import peft_vlm as pv
from peft_vlm.cli import main
from peft_vlm.data import read_dataset

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
COLOURS = {"red": (220, 20, 20), "blue": (20, 20, 220), "green": (20, 200, 20)}


@pytest.fixture
def own_data(tmp_path, tokenizer, lm_factory):
    """A tiny LM folder, and 12 LLaVA-format rows whose images lie beside the data file."""
    lm = tmp_path / "lm"
    lm_factory().save_pretrained(lm)
    tokenizer.save_pretrained(lm)
    folder = tmp_path / "mydata"
    folder.mkdir()
    for name, colour in COLOURS.items():
        Image.new("RGB", (32, 32), colour).save(folder / f"{name}.png")
    rows = [{"image": f"{name}.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                                        {"from": "gpt", "value": f"Colour: {name}."}]}
            for name in list(COLOURS) * 4]
    (folder / "train.json").write_text(json.dumps(rows))
    return tmp_path


def recipe(tmp_path, tiny_vit, **data) -> Path:
    path = tmp_path / "own.yaml"
    path.write_text(yaml.safe_dump({
        "name": "own",
        "model": {"language_model": str(tmp_path / "lm"), "vision": tiny_vit},
        "methods": [{"method": "lora", "r": 8, "target_modules": ["q_proj", "v_proj"]}],
        "data": {"train": {"format": "llava", "path": str(tmp_path / "mydata" / "train.json")},
                 "bad_samples": "skip", **data},
        "train": {"output_dir": str(tmp_path / "out"), "max_steps": 40, "batch_size": 4, "learning_rate": 1.0e-2,
                  "warmup_steps": 0, "report_to": None, "progress_bar": False, "checkpoint_every": 0},
    }))
    return path


def test_twelve_own_llava_rows_train_and_generate_answers_in_the_trained_format(own_data, tiny_vit, capsys,
                                                                                 monkeypatch):
    monkeypatch.chdir(own_data / "lm")  # image paths resolve against the data file's folder, not the working one
    assert main(["train", str(recipe(own_data, tiny_vit)), "--max-steps", "150"]) == 0
    capsys.readouterr()
    assert main(["generate", str(own_data / "out"), "--image", str(own_data / "mydata" / "red.png"),
                 "--prompt", "What colour?", "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out.strip().startswith("Colour:")


def test_a_run_on_a_data_file_whose_images_are_all_missing_fails_with_the_skip_report(own_data, tiny_vit, capsys):
    for image in (own_data / "mydata").glob("*.png"):
        image.unlink()
    assert main(["train", str(recipe(own_data, tiny_vit)), "--max-steps", "2"]) == 2
    error = capsys.readouterr().err
    assert "train.json: too many bad rows skipped" in error and "every row of a batch" in error
    assert "train.json:row 1" in error and "missing image file" in error


def test_skipping_more_than_max_skipped_share_of_the_rows_stops_the_run(own_data, tiny_vit, capsys):
    (own_data / "mydata" / "green.png").unlink()  # 4 of the 12 rows
    assert main(["train", str(recipe(own_data, tiny_vit)), "--max-steps", "3"]) == 2
    assert "more than 5% of the rows skipped" in capsys.readouterr().err
    assert main(["train", str(recipe(own_data, tiny_vit, max_skipped_share=0.5)), "--max-steps", "3"]) == 0


def test_a_share_outside_zero_to_one_is_refused_before_a_model_is_built(own_data, tiny_vit, capsys):
    assert main(["train", str(recipe(own_data, tiny_vit, max_skipped_share=1.5))]) == 2
    assert "data.max_skipped_share: 1.5 is not a share" in capsys.readouterr().err


def test_image_paths_resolve_against_the_data_files_folder_unless_image_root_is_given(own_data, monkeypatch):
    monkeypatch.chdir(own_data / "lm")
    data_file = own_data / "mydata" / "train.json"
    assert read_dataset(data_file, "llava")[0]["images"] == [str(own_data / "mydata" / "red.png")]
    assert read_dataset(data_file, "llava", image_root=own_data / "elsewhere")[0]["images"] == [
        str(own_data / "elsewhere" / "red.png")]


def test_removing_the_stream_that_feeds_a_trainable_group_is_an_error(own_data, tiny_vit, capsys):
    assert main(["train", str(RECIPES / "llama_adapter_v2_joint.yaml"), "--max-steps", "1",
                 "--set", f"model.language_model={own_data / 'lm'}", "--set", f"model.vision={tiny_vit}",
                 "--set", f"train.output_dir={own_data / 'joint'}", "--set", "data.captions=null",
                 "--set", "train.report_to=null"]) == 2
    assert "trainable group(s) vision get no data from instructions" in capsys.readouterr().err


def test_removing_every_stage_with_set_leaves_no_data_and_is_an_error(own_data, tiny_vit, capsys):
    assert main(["train", str(RECIPES / "llava_lora.yaml"), "--max-steps", "1", "--set", "stages=null",
                 "--set", f"model.language_model={own_data / 'lm'}", "--set", f"model.vision={tiny_vit}",
                 "--set", f"train.output_dir={own_data / 'stages'}", "--set", "train.report_to=null"]) == 2
    assert "has no training data" in capsys.readouterr().err


def test_a_dataset_with_one_bad_row_in_forty_trains_through_several_epochs(vlm_factory, tmp_path):
    model = pv.apply(vlm_factory(), pv.BiasScaleConfig())
    image = Image.new("RGB", (32, 32), (200, 10, 10))
    rows = [{"messages": [{"role": "user", "content": "<image>\nColour?"}, {"role": "assistant", "content": "red"}],
             "images": [image if i else str(tmp_path / "gone.png")], "source": f"mem:{i}"} for i in range(40)]
    dataset = pv.data.SampleDataset(pv.data.SampleList(rows), pv.data.SampleEncoder.for_model(model), "skip")
    config = pv.TrainConfig(output_dir=str(tmp_path / "run"), max_steps=30, batch_size=4, report_to=None,
                            progress_bar=False, checkpoint_every=0)
    assert pv.JointTrainer(model, config, data=dataset).train().steps == 30  # three epochs, one bad row each
    assert dataset.report.num_bad == 3
