"""Wrapping a VLM that transformers ships as a class: its processor, its image tokens, its frozen tower."""
import pytest
import torch
from transformers import AutoModelForImageTextToText

import peft_vlm as pv
from peft_vlm.model.transformers_vlm import TransformersVLM
from tiny_transformers_vlms import BUILDERS, batch, pictures, save_tiny, wrapped

ARCHITECTURES = list(BUILDERS)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {name: save_tiny(name, tmp_path_factory.mktemp(name)) for name in ARCHITECTURES}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_from_pretrained_wraps_a_transformers_vlm_folder(folders, arch):
    model = pv.VisionLanguageModel.from_pretrained(folders[arch])
    assert isinstance(model, TransformersVLM) and model.architecture == arch
    plain = AutoModelForImageTextToText.from_pretrained(folders[arch]).eval()
    inputs = batch(model, answers=False)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, plain(**inputs).logits)
    assert not any(p.requires_grad for p in model.parameters())  # nothing trains before a method is applied


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_image_positions_come_from_the_models_own_image_token(arch):
    model = wrapped(arch)
    pv.apply(model, pv.BiasScaleConfig())
    inputs = batch(model, answers=False)
    context = model._peft_vlm_state.context
    captured = []
    model.language_model.layers[0].register_forward_pre_hook(lambda *_: captured.append(context.token_types.clone()))
    with torch.no_grad():
        model(**inputs)
    expected = (inputs["input_ids"] == model.model.config.image_token_id).long()
    assert expected.sum() > 0 and torch.equal(captured[0], expected)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_labels_cover_the_answer_only(arch):
    model = wrapped(arch)
    inputs = batch(model)
    answers = [model.tokenizer.decode(row[row != -100]) for row in inputs["labels"]]
    assert answers == ["A red circle." + model.tokenizer.eos_token, "Yes." + model.tokenizer.eos_token]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_generate_gives_the_plain_models_greedy_answer(arch):
    model = wrapped(arch)
    inputs = batch(model, answers=False)
    with torch.no_grad():
        plain = model.model.generate(
            **inputs, max_new_tokens=6, do_sample=False, pad_token_id=model.tokenizer.pad_token_id
        )
    assert model.generate_ids(**inputs, max_new_tokens=6).tolist() == plain[:, inputs["input_ids"].shape[1]:].tolist()
    answers = model.generate(
        images=pictures(2), prompts=["What is in the picture?", "Is there a shape?"], max_new_tokens=4
    )
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_projector_trains_on_request_in_the_vision_group(arch):
    model = wrapped(arch, train_projector=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    prefixes = [f"model.{path}" for path in model.family.projector]  # modules, or a parameter (LLaVA-NeXT's newline)
    projector = {n for n, _ in model.named_parameters() if any(n == p or n.startswith(p + ".") for p in prefixes)}
    assert projector
    assert trainable == projector
    rows = [line.split() for line in str(pv.trainable_summary(model)).splitlines()]
    assert ["projector", "vision"] in [row[:2] for row in rows]


def test_a_plain_language_model_folder_is_not_wrapped(tmp_path, lm_factory):
    from peft_vlm.model.transformers_vlm import transformers_vlm_type

    lm_factory("llama").save_pretrained(tmp_path)
    assert transformers_vlm_type(tmp_path) is None
    assert transformers_vlm_type(tmp_path / "missing") is None


def test_load_in_4bit_is_refused_for_a_wrapped_model(folders):
    with pytest.raises(pv.ConfigError, match="load_in_4bit=True is not supported for a wrapped"):
        pv.VisionLanguageModel.from_pretrained(folders["llava"], load_in_4bit=True)
