"""The eval report says how many questions it asked (each counted once, with a type or without) and, where
questions share an input, how many distinct inputs the model was actually given."""
from types import SimpleNamespace

from peft_vlm.cli import format_figures
from peft_vlm.evaluation.vqa import Question, vqa_accuracy


def counting_model(calls):
    def generate(images, prompts, max_new_tokens, protocol):
        calls.extend(prompts)
        return ["red"] * len(prompts)

    return SimpleNamespace(eval=lambda: None, generate=generate, answer_protocol=None)


def test_the_report_gives_the_number_of_distinct_inputs_asked_when_questions_share_one():
    calls = []
    questions = [Question("What colour?", "red", "a.png", "colour"),
                 Question("What colour?", "blue", "a.png", "colour"),
                 Question("What shape?", "circle", "a.png", "shape")]
    accuracy = vqa_accuracy(counting_model(calls), questions)
    assert accuracy.asked == len(calls) == 2
    report = format_figures({"recipe": "eval", "accuracy": accuracy})
    assert "questions: 3 (per type: colour 2, shape 1); the model was asked 2 distinct ones" in report


def test_questions_without_a_type_are_counted_once_and_list_no_empty_types():
    calls = []
    accuracy = vqa_accuracy(counting_model(calls), [Question("Hi?", "red", None), Question("Ho?", "red", None)])
    report = format_figures({"recipe": "eval", "accuracy": accuracy})
    assert "questions: 2\n" in report + "\n" and "per type" not in report and "asked" not in report
