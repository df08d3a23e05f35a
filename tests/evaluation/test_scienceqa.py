"""ScienceQA: the reader takes the dataset's own problems.json layout; prompts, answers, accuracy by subject/context."""
import json

import pytest
from PIL import Image

import peft_vlm as pv
from peft_vlm.data import SampleEncoder
from peft_vlm.data.scienceqa import read_problems, training_samples
from peft_vlm.evaluation.scienceqa import evaluate, score

PROBLEMS = {
    "11": {"question": "Which animal is shown?", "choices": ["cat", "dog"], "answer": 1, "hint": "A pet.",
           "image": "image.png", "lecture": "Animals differ.", "solution": "It barks.", "subject": "natural science",
           "grade": "grade2", "split": "test", "topic": "biology"},
    "12": {"question": "Which colour is the square?", "choices": ["red", "blue", "green"], "answer": 0, "hint": "",
           "image": "image.png", "lecture": "", "solution": "", "subject": "natural science", "split": "test"},
    "13": {"question": "Which word is a noun?", "choices": ["run", "table"], "answer": 1, "hint": "Parts of speech.",
           "image": None, "lecture": "Nouns name things.", "solution": "A table is a thing.",
           "subject": "language science",
           "split": "test"},
    "14": {"question": "Which is a continent?", "choices": ["Asia", "Paris"], "answer": 0, "hint": "", "image": None,
           "lecture": "", "solution": "", "subject": "social science", "split": "test"},
    "15": {"question": "Which is hot?", "choices": ["ice", "fire"], "answer": 1, "hint": "", "image": None,
           "lecture": "", "solution": "", "subject": "natural science", "split": "train"},
}


@pytest.fixture
def scienceqa(tmp_path):
    (tmp_path / "problems.json").write_text(json.dumps(PROBLEMS))
    for problem_id in ("11", "12"):
        folder = tmp_path / "images" / "test" / problem_id
        folder.mkdir(parents=True)
        Image.new("RGB", (40, 40), (200, 30, 30)).save(folder / "image.png")
    return tmp_path / "problems.json"


def test_reader_takes_scienceqas_layout_with_images_under_split_and_id(scienceqa):
    problems = read_problems(scienceqa, split="test")
    assert [p.id for p in problems] == ["11", "12", "13", "14"]
    assert problems[0].image == str(scienceqa.parent / "images" / "test" / "11" / "image.png")
    assert problems[2].image is None and len(read_problems(scienceqa, split=None)) == 5


def test_prompt_has_context_question_and_lettered_options_after_the_image(scienceqa):
    first, second = read_problems(scienceqa)[:2]
    assert first.prompt() == "<image>\nContext: A pet.\nQuestion: Which animal is shown?\nOptions: (A) cat (B) dog"
    assert "Context: N/A\n" in second.prompt() and "(C) green" in second.prompt()


def test_answer_is_the_letter_with_optional_reasoning_after_or_before(scienceqa):
    problem = read_problems(scienceqa)[0]
    assert problem.target() == "The answer is (B)."
    assert problem.target("after") == "The answer is (B). BECAUSE: Animals differ. It barks."
    assert problem.target("before") == "Animals differ. It barks.\nThe answer is (B)."


def test_accuracy_by_subject_and_by_context_modality(scienceqa):
    problems = read_problems(scienceqa)
    accuracy = score(problems, ["The answer is (B).", "The answer is (C).", "Because... The answer is (B).", "A"])
    assert accuracy["all"] == 0.75
    assert accuracy.by("subject") == {"language science": 1.0, "natural science": 0.5, "social science": 1.0}
    assert accuracy.by("context") == {"image": 0.5, "none": 1.0, "text": 1.0}  # problem 11 counts as text and image
    assert "natural science 50.0%" in str(accuracy)


def test_training_samples_label_only_the_answer(scienceqa, vlm_factory):
    model = vlm_factory()
    samples = training_samples(read_problems(scienceqa), reasoning="after")
    encoded = SampleEncoder.for_model(model)(samples[0])
    answer = [t for t, label in zip(encoded["input_ids"], encoded["labels"]) if label != -100]
    assert model.tokenizer.decode(answer, skip_special_tokens=True).startswith("The answer is (B).")
    assert encoded["pixel_values"].shape[0] == 1 and samples[2]["images"] == []


def test_evaluate_answers_every_problem_with_the_model(scienceqa, vlm_factory):
    accuracy = evaluate(vlm_factory(), read_problems(scienceqa), batch_size=3, max_new_tokens=2)
    assert accuracy.total["all"] == 4 and set(accuracy.answers) == {"11", "12", "13", "14"}


def test_a_malformed_problem_is_an_error_naming_it(tmp_path):
    (tmp_path / "problems.json").write_text(
        json.dumps({"7": {"question": "?", "choices": ["a"], "answer": 3, "split": "test"}}))
    with pytest.raises(pv.ConfigError, match="problem 7: not in ScienceQA's layout"):
        read_problems(tmp_path / "problems.json")
