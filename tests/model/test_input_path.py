"""One input path: `tokenize`, `generate` and `pixel_values` prepare prompts and images exactly as training does."""
import pytest
import torch
from PIL import Image

import peft_vlm as pv
from peft_vlm.data import Collator, ImageProcessor, SampleEncoder
from peft_vlm.data.prompting import IGNORE_INDEX


def non_square(path, size=(64, 32)):
    """Left half red, right half blue: squashing, padding and cropping give different inputs."""
    image = Image.new("RGB", size, (255, 0, 0))
    image.paste((0, 0, 255), (size[0] // 2, 0, size[0], size[1]))
    image.save(path)
    return str(path)


def sample(image, question="Colour?", answer="red"):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "images": [image], "source": "s"}


@pytest.mark.parametrize("mode", ["letterbox", "crop"])
def test_a_non_square_image_is_preprocessed_at_inference_as_in_training(vlm_factory, tmp_path, mode):
    model = vlm_factory()
    path = non_square(tmp_path / "wide.png")
    trained = SampleEncoder.for_model(model, resize=mode)(sample(path))["pixel_values"]
    assert model.resize == mode  # the model remembers how its training data was preprocessed
    assert torch.equal(model.tokenize(["Colour?"], [path])["pixel_values"], trained)
    assert torch.equal(model.tokenize(["Colour?"], [Image.open(path)])["pixel_values"], trained)
    assert torch.equal(model.pixel_values([path]), trained)
    squashed = ImageProcessor.for_tower(model.vision_tower, "resize")(path)
    assert not torch.allclose(squashed, trained[0])  # the test would see a default-mode inference path


def test_generation_batches_run_the_images_the_model_was_trained_on(vlm_factory, tmp_path):
    model = vlm_factory()
    path = non_square(tmp_path / "wide.png")
    SampleEncoder.for_model(model, resize="letterbox")
    generated = model.generate(images=[path], prompts=["Colour?"], max_new_tokens=4)
    letterboxed = ImageProcessor.for_tower(model.vision_tower, "letterbox")(path)
    assert generated == model.generate(images=[letterboxed], prompts=["Colour?"], max_new_tokens=4)


def test_generate_takes_image_paths_as_well_as_pil_images(vlm_factory, tmp_path):
    model = vlm_factory()
    paths = [non_square(tmp_path / "a.png"), non_square(tmp_path / "b.png", size=(32, 48))]
    pil = [Image.open(path) for path in paths]
    prompts = ["Colour?", "What is in the picture?"]
    assert model.generate(images=paths, prompts=prompts, max_new_tokens=4) == \
        model.generate(images=pil, prompts=prompts, max_new_tokens=4)


@pytest.mark.parametrize("chat", [True, False])
def test_a_generation_prompt_is_the_training_prompt_without_its_answer(vlm_factory, tmp_path, chat):
    model = vlm_factory()
    path = non_square(tmp_path / "wide.png")
    encoder = SampleEncoder.for_model(model, use_chat_template=chat)
    example = encoder(sample(path, question="What colour is it?", answer="red and blue"))
    prompt = model.tokenize(["What colour is it?"], [path], chat=chat)
    answer_start = next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
    assert prompt["input_ids"][0].tolist() == example["input_ids"][:answer_start]
    assert "labels" not in prompt


def test_a_training_batch_from_tokenize_equals_the_collated_training_examples(vlm_factory, tmp_path):
    model = vlm_factory()
    paths = [non_square(tmp_path / "a.png"), non_square(tmp_path / "b.png", size=(40, 64))]
    encoder = SampleEncoder.for_model(model, resize="crop")
    collated = Collator.for_model(model)([encoder(sample(paths[0])), encoder(sample(paths[1], "Shape?", "a square"))])
    batch = model.tokenize(["Colour?", "Shape?"], paths, answers=["red", "a square"])
    assert set(batch) == set(collated)
    assert all(torch.equal(batch[key], collated[key]) for key in batch)


def test_the_resize_mode_travels_in_the_adapter_file(vlm_factory, tmp_path):
    model = vlm_factory()
    SampleEncoder.for_model(model, resize="letterbox")
    assert model.base_spec()["resize"] == "letterbox" and "resize" not in vlm_factory().base_spec()
    pv.save_adapter(model, tmp_path / "adapter")
    fresh = vlm_factory()
    assert fresh.resize == "resize"
    assert pv.load_adapter(fresh, tmp_path / "adapter").resize == "letterbox"


def test_an_encoder_without_a_resize_mode_follows_the_model(vlm_factory, tmp_path):
    model = vlm_factory()
    model.resize = "crop"
    path = non_square(tmp_path / "wide.png")
    pixels = SampleEncoder.for_model(model)(sample(path))["pixel_values"][0]
    assert model.resize == "crop" and torch.equal(pixels, ImageProcessor.for_tower(model.vision_tower, "crop")(path))


def test_paper_layout_early_fusion_gets_the_images_of_encoded_training_samples(vlm_factory, tmp_path):
    model = pv.apply(vlm_factory(), pv.EarlyFusionConfig(layers=1, visual_tokens_in_sequence=False))
    encoder = SampleEncoder.for_model(model)
    example = encoder(sample(non_square(tmp_path / "wide.png")))
    assert example["pixel_values"].shape[0] == 1
    batch = Collator.for_model(model)([example])
    model(**batch).loss.backward()
    gates = [p for name, p in model.named_parameters() if name.endswith("early_fusion.gate")]
    assert gates and all(gate.grad is not None and gate.grad.abs().sum() > 0 for gate in gates)


def test_an_unknown_resize_mode_is_refused_by_name(vlm_factory):
    with pytest.raises(pv.ConfigError, match="resize='stretch'"):
        vlm_factory().resize = "stretch"


def test_an_image_of_the_wrong_kind_is_a_clear_error_naming_the_prompt(vlm_factory):
    with pytest.raises(pv.ConfigError, match="prompt #1: expected an image path, a PIL image"):
        vlm_factory().tokenize(["Hi", "Colour?"], [None, 42])


def test_a_missing_image_file_is_a_data_error_naming_the_file(vlm_factory, tmp_path):
    with pytest.raises(pv.DataError, match="missing image file.*nowhere.png"):
        vlm_factory().generate(images=[str(tmp_path / "nowhere.png")], prompts=["Colour?"])
