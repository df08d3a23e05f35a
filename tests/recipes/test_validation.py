"""Every recipe, TrainConfig and method option is validated on load, before any model is built: type, range and
unknown keys (sections included), each error a ConfigError naming the key, the value and what is accepted."""
import os
from pathlib import Path

import pytest

import peft_vlm as pv
from peft_vlm import recipes
from peft_vlm.cli import main as cli
from peft_vlm.methods.registry import config_from_entry
from peft_vlm.recipes import check_recipe, load_recipe
from peft_vlm.training.preflight import check_output_dir

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
RECIPE = RECIPES / "qlora_single_gpu.yaml"

BAD_TRAIN_OPTIONS = {
    "max_grad_norm=-1": "max_grad_norm=-1 is not valid; max_grad_norm must be a number > 0, or null",
    "max_grad_norm=0": "max_grad_norm=0 is not valid",
    "max_steps=ten": "max_steps='ten' is not valid; max_steps takes an integer",
    "max_steps=true": "max_steps=True is not valid; max_steps takes an integer",
    "max_steps=0": "max_steps=0 is not valid; max_steps must be an integer >= 1",
    "warmup_steps=x": "warmup_steps='x' is not valid",
    "warmup_steps=-2": "warmup_steps=-2 is not valid; warmup_steps must be an integer >= 0",
    "batch_size=2.5": "batch_size=2.5 is not valid; batch_size takes an integer",
    "checkpoint_every=-1": "checkpoint_every=-1 is not valid; checkpoint_every must be an integer >= 0",
    "keep_checkpoints=0": "keep_checkpoints=0 is not valid; keep_checkpoints must be an integer >= 1",
    "learning_rate=abc": "learning_rate='abc' is not valid; learning_rate takes a number",
    "learning_rate=-1e-3": "learning_rate=-0.001 is not valid",
    "weight_decay=-0.1": "weight_decay=-0.1 is not valid",
    "betas=[0.9]": r"betas=\[0.9\] is not valid; betas takes a list of 2",
    "betas=[0.9,1.5]": r"betas=\[0.9, 1.5\] is not valid; betas must be two numbers in \[0, 1\)",
    "caption_ratio=2": "caption_ratio=2 is not valid",
    "log_every=0": "log_every=0 is not valid",
    "max_nonfinite_steps=0": "max_nonfinite_steps=0 is not valid",
    "gradient_checkpointing=1": "gradient_checkpointing=1 is not valid; gradient_checkpointing takes true or false",
    "group_learning_rates={vision: fast}": "group_learning_rates={'vision': 'fast'} is not valid",
    "lr_schedule=linear": "lr_schedule='linear' is not valid; lr_schedule must be 'cosine' or 'constant'",
    "seed=-1": "seed=-1 is not valid",
    "max_stepz=3": r"unknown training option\(s\) max_stepz",
}


@pytest.mark.parametrize("override", sorted(BAD_TRAIN_OPTIONS))
def test_each_bad_training_option_is_a_config_error_naming_it(override):
    with pytest.raises(pv.ConfigError, match=BAD_TRAIN_OPTIONS[override]):
        load_recipe(RECIPE, [f"train.{override}"])


def test_train_config_checks_types_in_python_too():
    for options, message in [({"max_steps": True}, "max_steps=True"), ({"batch_size": 2.5}, "batch_size=2.5"),
                             ({"max_grad_norm": -1.0}, "max_grad_norm=-1.0"), ({"report_to": 3}, "report_to=3")]:
        with pytest.raises(pv.ConfigError, match=message):
            pv.TrainConfig(**options)
    config = pv.TrainConfig(betas=[0.9, 0.99], max_grad_norm=None, learning_rate=1, caption_groups=["vision"])
    assert config.betas == (0.9, 0.99) and config.caption_groups == ("vision",)  # lists (from YAML) are tuples


BAD_RECIPE_VALUES = {
    "trian.max_steps=1": r"unknown section\(s\) trian",
    "x=[1": r"override 'x=\[1': the value is not valid YAML \(expected ',' or '\]'",
    "model.visoin=ViT-B-32": r"model section: unknown option\(s\) visoin",
    "model.load_in_4bit=maybe": "model section: load_in_4bit='maybe' is not valid; load_in_4bit takes true or false",
    "data.train.pth=x.json": r"data.train: unknown option\(s\) pth",
    "data.train.limit=many": "data.train: limit='many' is not valid",
    "data.shuffle=true": r"data section: unknown option\(s\) shuffle",
    "eval.limt=3": r"eval section: unknown option\(s\) limt",
    "eval.grey_image=3": "eval section: grey_image=3 is not valid; grey_image takes true or false",
    "methods.0.r=two": r"methods #1 \(lora\): r='two' is not valid; r takes an integer",
    "methods.0.rank=2": r"methods #1 \(lora\): unknown option\(s\) rank",
    "methods.0.lora_dropout=high": r"lora_dropout='high' is not valid; lora_dropout takes a number",
    "methods=[dora]": "methods: unknown method or preset 'dora'",
    "methods=[{r: 4}]": "methods #1: 'method' must name a method",
    "methods=lora": "methods: expected a list",
    "stages=[{name: a, trian: {}}]": r"stage #1: unknown option\(s\) trian",
    "stages=[{name: a, train: {max_steps: -1}}]": "stage 'a', train section: TrainConfig: max_steps=-1 is not valid",
    "name=[1]": r"name must be a string",
}


@pytest.mark.parametrize("override", sorted(BAD_RECIPE_VALUES))
def test_each_bad_recipe_value_is_refused_on_load_naming_it(override):
    with pytest.raises(pv.ConfigError, match=BAD_RECIPE_VALUES[override]):
        load_recipe(RECIPE, [override])


def test_every_shipped_recipe_validates_with_and_without_full():
    for path in sorted(RECIPES.glob("*.yaml")):
        recipe = load_recipe(path)
        assert recipe["name"] == path.stem
    assert load_recipe(RECIPES / "llama_adapter_v2_joint.yaml", full=True)["train"]["max_steps"] > 0


def test_method_entries_are_checked_by_one_function_for_presets_recipes_and_files():
    config = config_from_entry({"method": "adaption_prompt", "length": 4, "layers": 2}, "here")
    assert (config.length, config.layers) == (4, 2)
    for entry, message in [({"method": "adaption_prompt", "length": "4"}, r"here \(adaption_prompt\): length='4'"),
                           ({"method": "adaption_prompt", "size": 4}, r"unknown option\(s\) size"),
                           ({"method": "visual_expert", "layers": [0, "1"]}, "layers=\\[0, '1'\\] is not valid"),
                           ({"method": "lora", "bias": "some"}, "bias='some' is not valid; bias takes one of 'none'"),
                           (["lora"], "expected a mapping")]:
        with pytest.raises(pv.ConfigError, match=message):
            config_from_entry(entry, "here")
    with pytest.raises(pv.UnknownMethodError, match="unknown method 'dora'"):
        config_from_entry({"method": "dora"}, "here")


@pytest.fixture
def no_model_built(monkeypatch):
    """Fails the test if anything builds a model."""
    built = []
    monkeypatch.setattr(recipes, "build_model", lambda spec: built.append(spec) or pytest.fail("a model was built"))
    return built


def unwritable_folder(tmp_path) -> Path:
    """A folder no file can be created in: read-only permissions, or (root ignores those) a path under /proc."""
    if os.geteuid() == 0:
        return Path("/proc/peft-vlm-cannot-write-here")
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    return folder / "out"


def test_output_dir_that_is_a_file_or_unwritable_is_refused_before_the_model_is_built(tmp_path, no_model_built, capsys):
    (tmp_path / "taken").write_text("a file")
    for output_dir, message in [(tmp_path / "taken", "is a file, not a folder"),
                                (tmp_path / "taken" / "run", "lies in .*, which is a file, not a folder"),
                                (unwritable_folder(tmp_path), "is not writable")]:
        with pytest.raises(pv.ConfigError, match=f"output_dir '{output_dir}' {message}"):
            recipes.run_recipe(load_recipe(RECIPE, [f"train.output_dir={output_dir}"]))
        assert cli(["train", str(RECIPE), "--output-dir", str(output_dir)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"output_dir '{output_dir}'" in err
    assert no_model_built == []


def test_check_output_dir_creates_the_folder_and_leaves_nothing_in_it(tmp_path):
    folder = check_output_dir(tmp_path / "a" / "b")
    assert folder.is_dir() and list(folder.iterdir()) == []


def test_a_recipe_passed_as_a_dict_is_validated_before_any_model_is_built(tmp_path, no_model_built):
    recipe = load_recipe(RECIPE, [f"train.output_dir={tmp_path}"])
    recipe["train"]["max_grad_norm"] = -1  # changed after loading: run_recipe checks again
    with pytest.raises(pv.ConfigError, match="max_grad_norm=-1"):
        recipes.run_recipe(recipe)
    recipe["train"]["max_grad_norm"] = 1.0
    check_recipe(recipe)  # valid again
    assert no_model_built == []


@pytest.mark.parametrize("override", ["trian.max_steps=1", "x=[1", "train.max_steps=ten", "train.max_grad_norm=-1",
                                      "methods.0.r=two"])
def test_train_command_ends_in_one_line_and_a_nonzero_exit(override, no_model_built, capsys):
    assert cli(["train", str(RECIPE), "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("peft-vlm train: error:") and "Traceback" not in err
