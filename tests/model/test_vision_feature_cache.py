"""The frozen tower's features by image: the tower's own answer, kept on disk atomically, never used when the image,
the tower's weights or the preprocessing differ, and bypassed while the tower could answer differently."""
import logging

import peft
import pytest
import torch
from torch import nn

import peft_vlm as pv
from peft_vlm.model.vision_feature_cache import VisionFeatureCache, preprocessing_of
from peft_vlm.model.vision_towers import ModuleVisionTower


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_VLM_CACHE", str(tmp_path / "home"))


def patchifier(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 8, 8), nn.Flatten(2), nn.Dropout(dropout))


class Tokens(nn.Module):
    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.body = patchifier(dropout)

    def forward(self, pixels):
        return self.body(pixels).transpose(1, 2)


def frozen(tower: nn.Module) -> nn.Module:
    tower.requires_grad_(False)
    return tower.eval()


def test_cached_features_are_the_towers_own_and_the_second_lookup_is_a_hit(vlm_factory, images, tmp_path):
    model = vlm_factory()
    pixels = torch.stack(images)
    expected = model.encode_images(pixels)
    model.vision_feature_cache = cache = VisionFeatureCache(tmp_path / "features")
    first, second = model.encode_images(pixels), model.encode_images(pixels)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert cache.stats["misses"] == 3 and cache.stats["memory_hits"] == 3


def test_a_batch_of_hits_and_misses_computes_only_the_misses(vlm_factory, images, tmp_path):
    model = vlm_factory()
    seen = []
    model.vision_tower.register_forward_hook(lambda module, args, output: seen.append(len(args[0])))
    model.vision_feature_cache = VisionFeatureCache(tmp_path / "features")
    model.encode_images(torch.stack(images[:2]))
    model.encode_images(torch.stack(images))
    assert seen == [2, 1]


def test_entries_on_disk_serve_a_new_cache_and_no_partial_file_is_left(vlm_factory, images, tmp_path):
    model = vlm_factory()
    pixels = torch.stack(images)
    model.vision_feature_cache = VisionFeatureCache(tmp_path / "features")
    expected = model.encode_images(pixels)
    files = sorted((tmp_path / "features").rglob("*"))
    assert len([f for f in files if f.suffix == ".safetensors"]) == 3
    assert not [f for f in files if ".partial" in f.name]
    model.vision_feature_cache = fresh = VisionFeatureCache(tmp_path / "features")
    assert torch.equal(model.encode_images(pixels), expected)
    assert fresh.stats["disk_hits"] == 3 and fresh.stats["misses"] == 0


def test_a_damaged_file_is_not_used_and_is_written_again(vlm_factory, images, tmp_path):
    model = vlm_factory()
    pixels = torch.stack(images[:1])
    model.vision_feature_cache = VisionFeatureCache(tmp_path / "features")
    expected = model.encode_images(pixels)
    (path,) = (tmp_path / "features").rglob("*.safetensors")
    path.write_bytes(path.read_bytes()[:20])
    model.vision_feature_cache = fresh = VisionFeatureCache(tmp_path / "features")
    assert torch.equal(model.encode_images(pixels), expected)
    assert fresh.stats["misses"] == 1 and fresh.stats["written"] == 1


def test_changed_tower_weights_make_the_entries_stale(vlm_factory, images, tmp_path):
    model = vlm_factory()
    pixels = torch.stack(images)
    model.vision_feature_cache = cache = VisionFeatureCache(tmp_path / "features")
    before = model.encode_images(pixels)
    state = {name: value + 0.01 for name, value in model.vision_tower.state_dict().items()}
    model.vision_tower.load_state_dict(state)
    cache.stats.clear()
    after = model.encode_images(pixels)
    model.vision_feature_cache = None
    assert cache.stats["misses"] == 3 and cache.stats["memory_hits"] == 0
    assert torch.equal(after, model.encode_images(pixels)) and not torch.equal(after, before)


def test_weights_changed_through_data_make_the_entries_stale(vlm_factory, images, tmp_path):
    model = vlm_factory()
    model.vision_feature_cache = cache = VisionFeatureCache(tmp_path / "features")
    model.encode_images(torch.stack(images))
    with torch.no_grad():
        for parameter in model.vision_tower.parameters():
            parameter.data.mul_(1.5)  # bypasses the version counter, as peft's merge does
    cache.stats.clear()
    model.encode_images(torch.stack(images))
    assert cache.stats["misses"] == 3


def test_another_resize_mode_does_not_use_the_entries(vlm_factory, images, tmp_path):
    model = vlm_factory()
    model.vision_feature_cache = cache = VisionFeatureCache(tmp_path / "features")
    model.encode_images(torch.stack(images))
    model.resize = "letterbox"
    cache.stats.clear()
    model.encode_images(torch.stack(images))
    assert cache.stats["misses"] == 3


def test_another_image_size_or_normalisation_does_not_use_the_entries(tmp_path):
    tower = frozen(ModuleVisionTower(Tokens(), image_size=32))
    pixels = torch.randn(2, 3, 32, 32)
    cache = VisionFeatureCache(tmp_path / "features")
    base = preprocessing_of(tower, "resize")
    cache.patches(tower, pixels, base)
    for changed in ({**base, "image_size": [64, 64]}, {**base, "mean": [0.5, 0.5, 0.5]}):
        cache.stats.clear()
        cache.patches(tower, pixels, changed)
        assert cache.stats["misses"] == 2


def test_another_autocast_does_not_use_the_entries(tmp_path):
    tower = frozen(ModuleVisionTower(Tokens(), image_size=32))
    pixels = torch.randn(2, 3, 32, 32)
    cache = VisionFeatureCache(tmp_path / "features")
    cache.patches(tower, pixels, preprocessing_of(tower, "resize"))
    cache.stats.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cache.patches(tower, pixels, preprocessing_of(tower, "resize"))
    assert cache.stats["misses"] == 2


def test_a_stochastic_tower_in_training_mode_bypasses_the_cache_and_says_why_once(tmp_path, caplog):
    tower = frozen(ModuleVisionTower(Tokens(dropout=0.1), image_size=32))
    pixels = torch.randn(2, 3, 32, 32)
    cache = VisionFeatureCache(tmp_path / "features")
    tower.train()
    with caplog.at_level(logging.WARNING, logger="peft_vlm.model.vision_feature_cache"):
        for _ in range(3):
            cache.patches(tower, pixels, preprocessing_of(tower, "resize"))
    assert cache.stats["bypassed"] == 6 and cache.stats["misses"] == 0
    told = [r.getMessage() for r in caplog.records if "not used" in r.getMessage()]
    assert len(told) == 1 and "module.body.2 (p=0.1)" in told[0]
    tower.eval()  # dropout is off: the same features every time
    cache.patches(tower, pixels, preprocessing_of(tower, "resize"))
    assert cache.stats["misses"] == 2


def test_a_tower_with_vision_lora_bypasses_the_cache(vlm_factory, images, tmp_path):
    model = pv.apply(vlm_factory(), peft.LoraConfig(r=4, target_modules=["c_fc"]), target="vision")
    model.vision_feature_cache = cache = VisionFeatureCache(tmp_path / "features")
    model.encode_images(torch.stack(images))
    assert cache.stats["bypassed"] == 3 and not list((tmp_path / "features").rglob("*.safetensors"))


def test_the_memory_part_keeps_only_the_most_recent_entries_within_its_bytes(tmp_path):
    tower = frozen(ModuleVisionTower(Tokens(), image_size=32))
    entry_bytes = tower.num_tokens * tower.width * 4
    cache = VisionFeatureCache(None, memory_bytes=2 * entry_bytes)
    pixels = torch.randn(3, 3, 32, 32)
    preprocessing = preprocessing_of(tower, "resize")
    cache.patches(tower, pixels, preprocessing)
    cache.stats.clear()
    cache.patches(tower, pixels[1:], preprocessing)
    cache.patches(tower, pixels[:1], preprocessing)
    assert cache.stats["memory_hits"] == 2 and cache.stats["misses"] == 1
