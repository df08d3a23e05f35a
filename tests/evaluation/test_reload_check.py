"""The reload check: answers that differ only by the batching's rounding are explained in one line; a reloaded model
that does not hold the trained tensors fails the run, naming the first differing question."""
import dataclasses

import peft
import pytest
import torch
from PIL import Image

import peft_vlm as pv
from peft_vlm.data.answer_protocol import AnswerProtocol
from peft_vlm.evaluation.reload_check import ReloadMismatch, check_reload
from peft_vlm.evaluation.vqa import Question, vqa_accuracy

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


@pytest.fixture
def pair(vlm_factory, tmp_path):
    """A model with a LoRA adapter moved off zero, and the adapter saved and reloaded onto a fresh base."""
    trained = pv.apply(vlm_factory(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, parameter in trained.named_parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))
    pv.save_adapter(trained, tmp_path / "adapter")
    return trained, pv.load_adapter(vlm_factory(), tmp_path / "adapter")


def questions():
    return [Question(f"What colour? ({index})", name, Image.new("RGB", (32, 32), rgb), "color")
            for index, (name, rgb) in enumerate(list(COLOURS.items()) * 2)]


def answer(model, asked):
    return vqa_accuracy(model, asked, batch_size=4, protocol=AnswerProtocol(max_new_tokens=3))


def flipped(accuracy, index):
    """The answers, with question `index` answered otherwise: as a near-tied token flipped by another batching."""
    examples = list(accuracy.examples)
    question, expected, given = examples[index]
    examples[index] = (question, expected, given + " other")
    return dataclasses.replace(accuracy, examples=examples)


def test_the_same_answers_are_reported_identical(pair):
    trained, reloaded = pair
    asked = questions()
    check = check_reload(trained, reloaded, asked, answer(trained, asked), answer(reloaded, asked), answer)
    assert check.identical
    assert check.line("every question") == "saved adapter on a freshly loaded base: identical answers on every question"


def test_answers_that_agree_in_the_same_batch_are_explained_not_failed(pair):
    trained, reloaded = pair
    asked = questions()
    check = check_reload(trained, reloaded, asked, answer(trained, asked), flipped(answer(reloaded, asked), 4), answer,
                         precision="bf16")
    assert not check.identical and check.differing == [4]
    line = check.line("every question")
    assert "1 of 6 answers differ" in line and "bf16 rounding of the batches" in line and "same answers" in line


def test_a_corrupted_reload_fails_naming_the_first_differing_question_and_the_tensor(pair):
    trained, reloaded = pair
    asked = questions()
    name, parameter = next((n, p) for n, p in reloaded.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        parameter.mul_(3)
    with pytest.raises(ReloadMismatch, match=rf"tensor '{name}' differs.*question #2 'What colour\? \(2\)'"):
        check_reload(trained, reloaded, asked, answer(trained, asked), flipped(answer(reloaded, asked), 2), answer)


def test_equal_weights_that_answer_otherwise_in_the_same_batch_fail(pair):
    trained, reloaded = pair
    asked = questions()

    def answer_apart(model, subset):  # the reloaded model misses something the adapter file should carry
        return flipped(answer(model, subset), 0) if model is reloaded else answer(model, subset)

    with pytest.raises(ReloadMismatch, match=r"answer differently in the same batch.*question #1"):
        check_reload(trained, reloaded, asked, answer(trained, asked), flipped(answer(reloaded, asked), 1),
                     answer_apart)
