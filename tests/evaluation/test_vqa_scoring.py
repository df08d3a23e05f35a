"""VQA scoring: normalised exact match, and the answer after a marker for models that describe first."""
from peft_vlm.evaluation.vqa import Accuracy


def test_answer_after_a_marker_scores_only_what_follows_it():
    accuracy = Accuracy()
    accuracy.add("yes/no", "no", "A red circle. Answer: no", "is there a blue shape?", answer_after="Answer:")
    accuracy.add("color", "red", "A red circle.", "what colour is the shape?", answer_after="Answer:")  # no marker
    accuracy.add("shape", "circle", "A red circle. Answer: A red circle. Answer: circle", "what shape?",
                 answer_after="Answer:")
    accuracy.add("color", "red", "A red circle. Answer: blue", "what colour?", answer_after="Answer:")
    assert accuracy["yes/no"] == 1 and accuracy["shape"] == 1 and accuracy["color"] == 0
    assert accuracy.examples[1] == ("what colour is the shape?", "red", "A red circle.")  # the whole generation kept


def test_without_a_marker_the_whole_normalised_answer_is_compared():
    accuracy = Accuracy()
    accuracy.add("color", "red", "Red.", "q")
    accuracy.add("color", "red", "A red circle. Answer: red", "q")
    assert accuracy["color"] == 0.5
