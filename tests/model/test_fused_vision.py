"""Prismatic's fused vision backbone (two towers, channels concatenated) and the option to train the vision tower."""
import pytest
import torch
from PIL import Image
from torch import nn

import peft_vlm as pv
from peft_vlm.data import ImageProcessor
from peft_vlm.model.vision_towers import FusedVisionTower, ModuleVisionTower, build_vision_tower

TINY_DINO = {"vision": "timm:vit_small_patch14_dinov2", "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2,
             "num_heads": 2}


def fused(tiny_vit, **dino):
    return build_vision_tower([tiny_vit, {**TINY_DINO, **dino}])


def test_patch_features_of_both_towers_are_concatenated_along_channels(tiny_vit, images):
    tower = fused(tiny_vit)
    first, second = tower.towers
    pixels = torch.stack(images)
    with torch.no_grad():
        features = tower(pixels)
        expected_first = first(pixels)
    assert tower.width == 48 + 32 and tower.num_tokens == 16 and features.shape == (3, 16, 80)
    assert torch.equal(features[..., :48], expected_first)


def test_second_tower_sees_the_image_with_its_own_normalisation(tiny_vit):
    tower = fused(tiny_vit)
    first, second = tower.towers
    image = Image.new("RGB", (32, 32), (200, 40, 90))
    with torch.no_grad():
        got = tower(first.preprocess(image).unsqueeze(0))[..., 48:]
        expected = second(second.preprocess(image).unsqueeze(0))
    assert torch.allclose(got, expected, atol=1e-4)


def test_a_coarser_grid_is_interpolated_to_the_first_towers_grid(tiny_vit, images):
    tower = fused(tiny_vit, patch_size=16)  # 2x2 patches against the first tower's 4x4
    with torch.no_grad():
        assert tower(torch.stack(images)).shape == (3, 16, 80)


def test_mismatched_token_grids_are_refused_when_they_cannot_be_interpolated(tiny_vit):
    class Strip(nn.Module):  # 5 tokens: no square grid
        def forward(self, pixels):
            return pixels.new_zeros(len(pixels), 5, 8)

    with pytest.raises(pv.ConfigError, match="matching token grids.*16 tokens.*5"):
        FusedVisionTower(build_vision_tower(tiny_vit), ModuleVisionTower(Strip(), image_size=32))
    with pytest.raises(pv.ConfigError, match="interpolate=True"):
        FusedVisionTower(build_vision_tower(tiny_vit), fused(tiny_vit, patch_size=16).towers[1], interpolate=False)


def test_data_pipeline_uses_the_first_towers_normalisation(tiny_vit):
    tower = build_vision_tower([{**TINY_DINO}, tiny_vit])  # DINOv2 first: ImageNet statistics
    processor = ImageProcessor.for_tower(tower)
    image = Image.new("RGB", (32, 32), (200, 40, 90))
    assert torch.allclose(processor(image), tower.preprocess(image), atol=1e-5)


def test_vision_language_model_on_fused_towers_generates(tokenizer, lm_factory, tiny_vit, images):
    model = pv.VisionLanguageModel.from_pretrained(llm=lm_factory(), tokenizer=tokenizer, vision=[tiny_vit, TINY_DINO])
    assert model.connector.mlp[0].in_features == 80
    assert model.generate(images=[images[0]], prompts=["Colour?"], max_new_tokens=2)


def test_vision_tower_is_frozen_by_default_and_trains_as_group_vision_when_asked(
    tokenizer, lm_factory, tiny_vit, images, tmp_path
):
    frozen = pv.VisionLanguageModel.from_pretrained(llm=lm_factory(), tokenizer=tokenizer, vision=tiny_vit)
    assert not any(p.requires_grad for p in frozen.vision_tower.parameters())

    def build():
        torch.manual_seed(1)
        return pv.VisionLanguageModel.from_pretrained(llm=lm_factory(), tokenizer=tokenizer, vision=tiny_vit,
                                                      train_vision_tower=True).eval()

    model = build()
    rows = {(row.method, row.group): row.parameters for row in pv.trainable_summary(model).rows}
    assert rows[("vision_tower", "vision")] == sum(p.numel() for p in model.vision_tower.parameters())
    batch = model.tokenize(["Colour?"], [images[0]], answers=["red"])
    before = [p.detach().clone() for p in model.vision_tower.parameters()]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    model(**batch).loss.backward()
    optimizer.step()
    model.eval()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.vision_tower.parameters()))
    pv.save_adapter(model, tmp_path / "adapter")
    reloaded = pv.load_adapter(build(), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, model(**batch).logits)
