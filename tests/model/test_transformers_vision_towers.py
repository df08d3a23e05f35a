"""Vision towers from transformers (CLIP, SigLIP, DINOv2 through AutoModel) in the builder, with their processors."""
import pytest
import torch
from transformers import AutoImageProcessor, AutoModel

import peft_vlm as pv
from conftest import make_lm, make_tokenizer
from peft_vlm.model.vision_towers import TransformersVisionTower
from tiny_transformers_vlms import pictures, save_tiny_tower

PREFIX = {"clip": 1, "siglip": 0, "dinov2": 1}  # class tokens dropped from the patch tokens


@pytest.mark.parametrize("kind", list(PREFIX))
def test_tower_gives_the_patch_tokens_of_the_second_to_last_layer(kind, tmp_path):
    folder = save_tiny_tower(kind, tmp_path)
    tower = TransformersVisionTower(folder)
    assert (tower.num_tokens, tower.width, tower.prefix_tokens) == (16, 32, PREFIX[kind])
    image = pictures(1)[0]
    pixels = AutoImageProcessor.from_pretrained(folder)(images=image, return_tensors="pt")["pixel_values"]
    assert torch.equal(tower.preprocess(image), pixels[0])  # the processor's own image transform
    reference = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = reference(pixels, output_hidden_states=True).hidden_states[-2][:, PREFIX[kind]:]
        assert torch.equal(tower(pixels), expected)


@pytest.mark.parametrize("kind", list(PREFIX))
def test_builder_takes_a_transformers_tower_by_path(kind, tmp_path):
    model = pv.VisionLanguageModel.from_pretrained(llm=make_lm(), tokenizer=make_tokenizer(),
                                                   vision=f"transformers:{save_tiny_tower(kind, tmp_path)}").eval()
    assert isinstance(model.vision_tower, TransformersVisionTower)
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    inputs = model.tokenize(["What is in the picture?"], images=[pictures(1)])
    with torch.no_grad():
        before = model(**inputs).logits
    pv.apply(model, pv.BiasScaleConfig(), pv.EarlyFusionConfig(layers=1, visual_tokens_in_sequence=True))
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, before, atol=1e-6, rtol=0)


def test_adapter_refuses_a_base_with_another_transformers_tower(tmp_path):
    def build(seed):
        folder = save_tiny_tower("clip", tmp_path / f"clip{seed}", seed=seed)
        return pv.VisionLanguageModel.from_pretrained(llm=make_lm(), tokenizer=make_tokenizer(),
                                                      vision=f"transformers:{folder}")

    pv.save_adapter(pv.apply(build(0), pv.BiasScaleConfig()), tmp_path / "adapter")
    pv.load_adapter(build(0), tmp_path / "adapter")
    with pytest.raises(pv.AdapterMismatchError, match="weights"):
        pv.load_adapter(build(1), tmp_path / "adapter")


def test_a_folder_without_a_vision_model_is_a_clear_error(tmp_path):
    with pytest.raises(pv.ModelLoadError, match="could not load a transformers vision model"):
        TransformersVisionTower(str(tmp_path / "missing"))
