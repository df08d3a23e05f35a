"""Every number a user gives is checked before anything is built: finite, of a size a run can use, in range; a recipe
file says each key once and stays small; `~` in a path is the home folder."""
from pathlib import Path

import pytest

import peft_vlm as pv
from peft_vlm import recipes
from peft_vlm.cli import main as cli
from peft_vlm.data import read_dataset
from peft_vlm.recipes import load_recipe

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "qlora_single_gpu.yaml"


@pytest.fixture
def no_model_built(monkeypatch):
    monkeypatch.setattr(recipes, "build_model", lambda spec: pytest.fail("a model was built"))


@pytest.mark.parametrize("override, message", [
    ("train.learning_rate=.inf", "learning_rate=inf is not valid; learning_rate takes a number"),
    ("train.learning_rate=.nan", "learning_rate=nan is not valid"),
    ("train.weight_decay=.nan", "weight_decay=nan is not valid"),
    ("train.weight_decay=.inf", "weight_decay=inf is not valid"),
    ("train.group_learning_rates={vision: .inf}", "group_learning_rates={'vision': inf} is not valid"),
    ("train.batch_size=1000000000000000000", "batch_size=1000000000000000000 is not valid; .*below 2"),
    ("methods.0.r=100000000000", r"methods #1 \(lora\): r=100000000000 is not valid"),
    ("eval.limit=0", "eval section: limit=0 is not valid; limit must be at least 1"),
    ("eval.limit=-3", "eval section: limit=-3 is not valid"),
    ("eval.max_new_tokens=0", "max_new_tokens=0 is not valid; max_new_tokens must be at least 1"),
    ("eval.batch_size=-1", "batch_size=-1 is not valid"),
    ("data.train.limit=-1", "data.train: limit=-1 is not valid"),
    ("data.max_length=0", "max_length=0 is not valid"),
])
def test_a_number_no_run_can_use_is_refused_on_load_naming_it(override, message):
    with pytest.raises(pv.ConfigError, match=message):
        load_recipe(RECIPE, [override])


def test_a_non_finite_or_huge_number_is_refused_by_train_config_in_python_too():
    for options, message in [({"learning_rate": float("inf")}, "learning_rate=inf"),
                             ({"weight_decay": float("nan")}, "weight_decay=nan"),
                             ({"batch_size": 10**18}, "batch_size=1000000000000000000")]:
        with pytest.raises(pv.ConfigError, match=message):
            pv.TrainConfig(**options)


@pytest.mark.parametrize("arguments, name", [
    (["eval", "adapter.safetensors", "--limit", "0"], "--limit"),
    (["eval", "adapter.safetensors", "--limit", "-2"], "--limit"),
    (["eval", "adapter.safetensors", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", "adapter.safetensors", "--prompt", "hi", "--max-new-tokens", "-1"], "--max-new-tokens"),
])
def test_a_command_line_count_below_one_is_refused_naming_it(arguments, name, capsys, no_model_built):
    with pytest.raises(SystemExit) as stopped:
        cli(arguments)
    assert stopped.value.code == 2 and name in capsys.readouterr().err


@pytest.mark.parametrize("override", ["eval.limit=0", "eval.max_new_tokens=-1"])
def test_an_eval_count_below_one_in_a_recipe_is_refused_before_a_model_is_built(override, capsys, no_model_built):
    assert cli(["eval", "adapter.safetensors", "--recipe", str(RECIPE), "--set", override]) == 2
    assert override.split(".")[1].split("=")[0] in capsys.readouterr().err


@pytest.mark.parametrize("text, key", [
    ("name: a\ntrain: {max_steps: 1}\ntrain: {max_steps: 2}\n", "train"),
    ("name: a\ntrain:\n  max_steps: 1\n  batch_size: 2\n  max_steps: 3\n", "max_steps"),
])
def test_a_key_given_twice_in_a_recipe_is_an_error_naming_it(tmp_path, text, key):
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(pv.ConfigError, match=f"not valid YAML: key '{key}' is given twice at line"):
        load_recipe(path)


def test_a_key_overriding_a_merged_mapping_is_not_a_repeat(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("name: a\ntrain: &base {max_steps: 1, batch_size: 2}\n"
                    "stages:\n  - {name: s, train: {<<: *base, max_steps: 3}}\n")
    assert load_recipe(path)["stages"][0]["train"] == {"max_steps": 3, "batch_size": 2}


def test_a_recipe_whose_aliases_expand_beyond_reason_is_refused(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(pv.ConfigError, match="aliases expand it to over 100,000 values"):
        load_recipe(path)


def test_a_recipe_nested_beyond_reason_is_refused(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("name: a\ntrain: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(pv.ConfigError, match="is nested too deeply"):
        load_recipe(path)


def test_a_recipe_file_over_a_megabyte_is_refused_unread(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text("name: a\n" + "#" * (1 << 20) + "\n")
    with pytest.raises(pv.ConfigError, match="recipe .* is 1,048,585 bytes; a recipe is at most 1,048,576"):
        load_recipe(path)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_a_tilde_in_recipe_paths_is_the_home_folder(home):
    recipe = load_recipe(RECIPE, ["data.train.path=~/data.json", "data.image_root=~/images",
                                  "train.output_dir=~/out", "model.language_model=~/lm"])
    assert recipe["data"]["train"]["path"] == str(home / "data.json")
    assert recipe["data"]["image_root"] == str(home / "images")
    assert recipe["train"]["output_dir"] == str(home / "out")
    assert recipe["model"]["language_model"] == str(home / "lm")
    (home / "recipe.yaml").write_text(RECIPE.read_text())
    assert load_recipe("~/recipe.yaml")["name"] == "qlora_single_gpu"


def test_a_tilde_in_train_config_data_and_adapter_paths_is_the_home_folder(home, lm_factory):
    assert pv.TrainConfig(output_dir="~/run").output_dir == str(home / "run")
    (home / "data.json").write_text('[{"conversations": [{"from": "human", "value": "Hi?"}, '
                                    '{"from": "gpt", "value": "Yes."}]}]')
    assert len(read_dataset("~/data.json", "llava")) == 1
    lm = pv.apply(lm_factory(), pv.BiasScaleConfig())
    saved = pv.save_adapter(lm, "~/adapter")
    assert Path(saved).is_relative_to(home)
    pv.load_adapter(lm_factory(), "~/adapter")


def test_a_tilde_in_python_model_and_export_paths_is_the_home_folder(home, lm_factory, tokenizer, tiny_vit):
    lm_factory().save_pretrained(home / "lm")
    tokenizer.save_pretrained(home / "lm")
    assert pv.VisionLanguageModel.from_pretrained("~/lm", vision=tiny_vit).tokenizer is not None
    from tiny_transformers_vlms import wrapped

    assert pv.export_transformers(wrapped("llava"), "~/exported") == home / "exported"
    assert (home / "exported" / "config.json").is_file()
