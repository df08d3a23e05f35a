"""BLIP-2's question-conditioned Q-Former (`connector="qformer_question"`, sec 4.3): the prompt steers which visual
tokens the language model gets, the answer being trained on never reaches them, and padding or packing changes
nothing."""
import pytest
import torch

import peft_vlm as pv
from peft_vlm.data import Collator, SampleEncoder

from conftest import train_steps


def visual_tokens_of(model, batch) -> torch.Tensor:
    """What the connector handed the language model in one forward of `batch`."""
    seen = []
    handle = model.connector.register_forward_hook(lambda module, args, output: seen.append(output.detach()))
    with torch.no_grad():
        model(**batch)
    handle.remove()
    (tokens,) = seen
    return tokens


@pytest.fixture
def model(vlm_factory):
    return vlm_factory(connector="qformer_question")


def test_the_question_steers_the_visual_tokens_the_plain_qformer_does_not(vlm_factory, model, images):
    questions = ["what colour is the shape?", "is there a circle?"]
    steered = [visual_tokens_of(model, model.tokenize([q], [images[0]])) for q in questions]
    assert not torch.allclose(steered[0], steered[1], atol=1e-4)
    plain = vlm_factory(connector="qformer")
    fixed = [visual_tokens_of(plain, plain.tokenize([q], [images[0]])) for q in questions]
    assert torch.equal(fixed[0], fixed[1])


def test_the_answer_trained_on_never_reaches_the_visual_tokens(model, images):
    """Same prompt, different answers: the Q-Former reads the same text, which is the text it reads when asked."""
    prompt = ["is there a red shape?"]
    with_yes = visual_tokens_of(model, model.tokenize(prompt, [images[0]], answers=["yes"]))
    with_no = visual_tokens_of(model, model.tokenize(prompt, [images[0]], answers=["no, a blue one"]))
    asked = visual_tokens_of(model, model.tokenize(prompt, [images[0]]))
    assert torch.allclose(with_yes, with_no, atol=1e-5)  # equal up to float sums over more padding
    assert torch.allclose(with_yes, asked, atol=1e-5)


def test_left_padding_and_a_longer_neighbour_change_nothing(model, images):
    short = "red?"
    alone = visual_tokens_of(model, model.tokenize([short], [images[0]]))
    batched = visual_tokens_of(model, model.tokenize(
        [short, "is there a shape of any colour in the middle of this picture?"], [images[0], images[1]]))
    assert torch.allclose(batched[0], alone[0], atol=1e-5)


def test_in_a_packed_row_each_image_reads_its_own_examples_question(model, images):
    encoder = SampleEncoder.for_model(model)
    examples = [encoder({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                         "images": [image], "source": f"row {i}"})
                for i, (q, a, image) in enumerate([("what colour?", "red", images[0]),
                                                   ("is it a circle?", "no", images[1]),
                                                   ("describe it", "a small square " * 8, images[2])])]
    plain = Collator(model.tokenizer.pad_token_id)(examples)
    packed = Collator(model.tokenizer.pad_token_id, packing=True)(examples)
    assert len(packed["input_ids"]) < len(plain["input_ids"])  # at least two examples share a row
    in_example_order = visual_tokens_of(model, packed)[packed["image_sequences"].argsort()]
    assert torch.allclose(in_example_order, visual_tokens_of(model, plain), atol=1e-5)


def test_it_trains_with_the_language_model_frozen_and_reloads_exactly(vlm_factory, model, images, tmp_path):
    assert not any(p.requires_grad for p in model.language_model.parameters())
    batch = model.tokenize(["what colour?", "is there a circle?"], [images[0], images[1]], answers=["red", "no"])
    losses = train_steps(model, batch, steps=6)
    assert losses[-1] < losses[0] - 0.1
    assert all(p.grad is not None for p in model.connector.question_in.parameters())
    pv.save_adapter(model, tmp_path / "adapter")
    reloaded = pv.load_adapter(vlm_factory(connector="qformer_question"), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, model(**batch).logits)
