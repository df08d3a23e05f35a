"""Eval rows as data files give them: a row that starts with a system turn is scored on its user's question."""
import json

import pytest

import peft_vlm as pv
from peft_vlm.evaluation.vqa import Question
from peft_vlm.recipes import evaluation_questions


def test_a_row_that_starts_with_a_system_turn_scores_the_users_question(tmp_path):
    rows = [{"conversations": [{"from": "system", "value": "You answer in one word."},
                               {"from": "human", "value": "<image>\nWhat colour is the circle?"},
                               {"from": "gpt", "value": "Red"}], "image": "a.png"},
            {"conversations": [{"from": "human", "value": "Is there a square?"}, {"from": "gpt", "value": "No"}]}]
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(rows))
    questions = evaluation_questions({"path": str(path), "format": "llava"})
    assert [(q.question, q.answer) for q in questions] == [("What colour is the circle?", "Red"),
                                                           ("Is there a square?", "No")]


def test_a_row_with_no_answer_after_its_question_is_a_data_error_naming_it():
    sample = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
              "source": "eval.json:row 3"}
    with pytest.raises(pv.DataError, match="eval.json:row 3: wrong schema"):
        Question.from_sample(sample)
