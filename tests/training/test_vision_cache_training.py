"""`train.cache_vision_features`: the same losses with the cache as without, on when the tower is frozen and the
data repeats, refused (True) or left off (None) for a tower that trains."""
import sys
from pathlib import Path

import peft
import pytest

import peft_vlm as pv
from peft_vlm.data import SampleDataset, SampleEncoder

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
from train_tiny import samples  # noqa: E402


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_VLM_CACHE", str(tmp_path / "home"))


def lora_model(vlm_factory, vision_lora=False):
    model = pv.apply(vlm_factory(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    if vision_lora:
        pv.apply(model, peft.LoraConfig(r=4, target_modules=["c_fc"]), target="vision")
    return model


def trainer_for(model, tmp_path, rows=6, **options):
    encoder = SampleEncoder.for_model(model)
    config = pv.TrainConfig(**{
        "output_dir": str(tmp_path / "run"), "max_steps": 6, "batch_size": 2, "learning_rate": 5e-3,
        "mixed_precision": "no", "report_to": None, "progress_bar": False, "checkpoint_every": 0, **options})
    return pv.JointTrainer(model, config, caption_data=SampleDataset(samples("caption", rows), encoder),
                           instruction_data=SampleDataset(samples("instruction", rows), encoder))


def test_the_losses_with_the_cache_equal_the_losses_without_it(vlm_factory, tmp_path):
    without = trainer_for(lora_model(vlm_factory), tmp_path / "a", cache_vision_features=False).train()
    trainer = trainer_for(lora_model(vlm_factory), tmp_path / "b", cache_vision_features=True)
    cached = trainer.train()
    assert trainer.vision_cache.stats["memory_hits"] > 0
    assert [h["stream"] for h in cached.history] == [h["stream"] for h in without.history]
    assert [h["loss"] for h in cached.history] == pytest.approx([h["loss"] for h in without.history], abs=1e-6)


def test_by_default_the_cache_is_on_when_the_data_repeats(vlm_factory, tmp_path):
    # 6 steps, half of them caption steps of 2 rows: 6 rows of each stream are one epoch, 4 rows are 1.5
    assert trainer_for(lora_model(vlm_factory), tmp_path / "a", rows=4).vision_cache is not None
    assert trainer_for(lora_model(vlm_factory), tmp_path / "b", rows=6).vision_cache is None


def test_false_leaves_the_cache_off_even_when_the_data_repeats(vlm_factory, tmp_path):
    model = lora_model(vlm_factory)
    assert trainer_for(model, tmp_path, rows=4, cache_vision_features=False).vision_cache is None
    assert model.vision_feature_cache is None


def test_by_default_a_tower_that_trains_gets_no_cache(vlm_factory, tmp_path):
    model = lora_model(vlm_factory, vision_lora=True)
    assert trainer_for(model, tmp_path, rows=4).vision_cache is None
    assert model.vision_feature_cache is None


def test_true_with_a_tower_that_trains_is_refused_naming_its_trainable_parameters(vlm_factory, tmp_path):
    with pytest.raises(pv.ConfigError, match=r"cache_vision_features=True needs a frozen vision tower.*lora_A"):
        trainer_for(lora_model(vlm_factory, vision_lora=True), tmp_path, cache_vision_features=True)


def test_true_with_sharded_weights_is_refused(vlm_factory, tmp_path):
    with pytest.raises(pv.ConfigError, match="single-process and DDP"):
        trainer_for(lora_model(vlm_factory), tmp_path, cache_vision_features=True, sharding="fsdp2")


def test_the_option_takes_true_false_or_null_only():
    with pytest.raises(pv.ConfigError, match="cache_vision_features"):
        pv.TrainConfig(cache_vision_features="yes")
