"""SigLIP 2 (NaFlex) towers from transformers in the builder: flattened patches from its own processor, one grid."""
import peft
import pytest
import torch
from transformers import AutoImageProcessor, AutoModel

import peft_vlm as pv
from conftest import assert_cached_generation_matches_full_decoding, make_lm, make_tokenizer, train_steps
from peft_vlm.model.vision_towers import FusedVisionTower, TransformersVisionTower
from tiny_transformers_vlms import pictures, save_tiny_tower


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_tower("siglip2", tmp_path_factory.mktemp("siglip2"))


def build(folder):
    return pv.VisionLanguageModel.from_pretrained(llm=make_lm(), tokenizer=make_tokenizer(),
                                                  vision=f"transformers:{folder}").eval()


def test_tower_gives_the_hidden_states_of_its_processors_patches(folder):
    tower = TransformersVisionTower(folder)
    assert tower.patch_inputs and (tower.num_tokens, tower.width, tower.grid_size) == (16, 32, (4, 4))
    square = pictures(1)[0].resize(tower.image_size)
    processed = AutoImageProcessor.from_pretrained(folder)(images=square, return_tensors="pt")
    assert torch.equal(tower.preprocess(square), processed["pixel_values"][0])  # the processor's own patches
    reference = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = reference(**processed, output_hidden_states=True).hidden_states[-2]
        assert torch.equal(tower(processed["pixel_values"]), expected)


@pytest.mark.parametrize("mode", ["resize", "letterbox", "crop"])
def test_every_image_shape_gets_the_towers_one_grid(folder, mode):
    from PIL import Image

    model = build(folder)
    model.resize = mode
    wide, tall = Image.new("RGB", (40, 12), "red"), Image.new("RGB", (10, 30), "blue")
    pixels = model.pixel_values([wide, tall])
    assert pixels.shape == (2, 16, 3 * 4 * 4)  # the processor alone would give them 2x7 and 6x2 grids
    assert model.encode_images(pixels).shape == (2, 16, 64)


def test_model_on_a_siglip2_tower_trains_and_generates(folder):
    model = build(folder)
    inputs = model.tokenize(["What is in the picture?", "Is there a shape?"], images=pictures(2),
                            answers=["A red circle.", "Yes."])
    with torch.no_grad():
        before = model(**inputs).logits
    pv.apply(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), pv.BiasScaleConfig())
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)  # identity at initialisation
    tower = {name: p.clone() for name, p in model.vision_tower.state_dict().items()}
    losses = train_steps(model, inputs, 4)
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, tower[name]) for name, p in model.vision_tower.state_dict().items())  # frozen
    prompt = model.tokenize(["What is in the picture?"], images=pictures(1))
    assert_cached_generation_matches_full_decoding(model, prompt, steps=4)
    assert isinstance(model.generate(images=pictures(1), prompts=["What is in the picture?"], max_new_tokens=3)[0],
                      str)


def test_adapter_round_trip_on_a_siglip2_base(folder, tmp_path):
    model = build(folder)
    pv.apply(model, pv.BiasScaleConfig())
    inputs = model.tokenize(["What is in the picture?"], images=pictures(1), answers=["A red circle."])
    train_steps(model, inputs, 2)
    pv.save_adapter(model, tmp_path / "adapter")
    loaded = pv.load_adapter(build(folder), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


def test_export_refuses_a_siglip2_tower_by_name_before_writing(folder, tmp_path):
    model = build(folder)
    with pytest.raises(pv.ConfigError, match="siglip2_vision_model.*NaFlex.*fixed-grid"):
        pv.export_transformers(model, tmp_path / "exported")
    assert not (tmp_path / "exported").exists()


def test_a_siglip2_tower_cannot_be_fused(folder, tmp_path):
    with pytest.raises(pv.ConfigError, match="siglip2_vision_model takes flattened patches"):
        FusedVisionTower(TransformersVisionTower(folder),
                         TransformersVisionTower(save_tiny_tower("siglip", tmp_path / "siglip")))
