"""Expert context (LLaMA-Adapter V2 sec 4.4): an external expert's text about each image joins the prompt."""
import pytest

import peft_vlm as pv
from peft_vlm.model.expert_context import generate_with_expert, with_expert_context


def caption(image):
    return f"a picture numbered {image}"


def test_expert_text_goes_after_the_leading_image_placeholders():
    prompts = with_expert_context(["What is it?", "<image>\nColour?", "Hi"], [1, 2, None], caption)
    assert prompts == ["<image>\nImage context: a picture numbered 1\nWhat is it?",
                       "<image>\nImage context: a picture numbered 2\nColour?", "Hi"]


def test_several_images_join_their_texts_and_images_elsewhere_put_the_context_in_front():
    (prompt,) = with_expert_context(["Compare <image> with <image>"], [[1, 2]], caption)
    assert prompt == "Image context: a picture numbered 1 a picture numbered 2\nCompare <image> with <image>"


def test_empty_expert_text_leaves_the_prompt_unchanged():
    assert with_expert_context(["Colour?"], ["x"], lambda image: "  ") == ["Colour?"]


def test_an_expert_returning_no_text_is_a_clear_error():
    with pytest.raises(pv.ConfigError, match="expert returned int for image #0"):
        with_expert_context(["Colour?"], ["x"], lambda image: 3)


def test_generation_with_an_expert_sees_the_context(vlm_factory, images):
    model = vlm_factory()
    seen = []
    answers = generate_with_expert(model, [images[0]], ["Colour?"], lambda image: seen.append(image) or "red circle",
                                   max_new_tokens=2)
    assert len(answers) == 1 and seen[0] is images[0]
    with_context = model.tokenize(with_expert_context(["Colour?"], [images[0]], lambda i: "red circle"), [images[0]])
    plain = model.tokenize(["Colour?"], [images[0]])
    assert with_context["input_ids"].shape[1] > plain["input_ids"].shape[1]
