"""The contrastively pretrained vision tower: trains, caches under the recipe's hash, loads as a frozen tower."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("easy_vqa")

from conftest import make_lm  # noqa: E402

import peft_vlm as pv  # noqa: E402
from peft_vlm.embedded import tower_pretraining as vp  # noqa: E402

# open_clip's tokenizer needs the full vocabulary; everything else is tiny.
TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
             "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1}}


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    import open_clip

    monkeypatch.setenv("PEFT_VLM_CACHE", str(tmp_path))
    (tmp_path / "test-tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(str(tmp_path / "test-tiny-clip.json"))
    return tmp_path


def test_same_caption_pairs_are_positives():
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    low = vp.contrastive_loss(images, images, ["a", "a", "b"], torch.tensor(20.0))
    high = vp.contrastive_loss(images, images, ["a", "b", "b"], torch.tensor(20.0))
    assert low + 1 < high  # the minimum is the targets' entropy, not 0


def test_tower_is_trained_once_then_read_from_the_cache_and_loads_frozen(cache, tokenizer):
    recipe = vp.TowerRecipe(model="test-tiny-clip", steps=2, batch_size=8, limit=16)
    random_state = torch.get_rng_state()
    path = vp.pretrained_tower(recipe)
    assert torch.equal(torch.get_rng_state(), random_state)  # training on first use leaves the caller's RNG alone
    assert path.startswith(str(cache)) and recipe.key() in path
    assert vp.pretrained_tower(recipe) == path  # cached: no second training
    assert vp.TowerRecipe(model="test-tiny-clip", steps=3, batch_size=8, limit=16).key() != recipe.key()
    weights = load_file(path)
    model = pv.VisionLanguageModel.from_pretrained(
        llm=make_lm(), tokenizer=tokenizer, vision="test-tiny-clip", vision_pretrained=path,
        connector="downsample2x2_mlp",
        vision_options={"feature_layer": -1})
    assert torch.equal(model.vision_tower.visual.conv1.weight, weights["visual.conv1.weight"])
    assert model.tokens_per_image == 4  # (32 / 8)^2 patches, 2x2 merged
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    # adapter files name the cached tower portably: the cache folder differs between machines
    assert model.base_spec()["vision"] == "embedded_contrastive" and model.base_spec()["vision_pretrained"] is None
    assert model.vision_tower.description["pretrained"] == Path(path).name
    assert model.base_spec()["vision_options"] == {"feature_layer": -1}
