"""VQA scoring: normalised exact match, and the answer after a marker for models that describe first."""
from peft_vlm.data.formats import CAPTION_PROMPT
from peft_vlm.data.answer_protocol import AnswerProtocol, described_question
from peft_vlm.evaluation.vqa import Accuracy, Question, vqa_accuracy

DESCRIBE = AnswerProtocol(describe_first=True, max_new_tokens=8)


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


class Describer:
    """A stand-in model: describes every image as a red circle, answers "yes" iff its prompt holds that description."""

    def __init__(self):
        self.prompts = []

    def eval(self):
        return self

    def generate(self, images, prompts, max_new_tokens, protocol=None):
        self.prompts.append(list(prompts))
        return ["A red circle." if p == CAPTION_PROMPT else ("yes" if "shows a red circle" in p else "no")
                for p in prompts]


def test_describe_first_answers_after_the_models_own_description():
    questions = [Question("is there a red shape?", "yes", "a.png", "yes/no"),
                 Question("is there a blue shape?", "no", "b.png", "yes/no")]
    model = Describer()
    plain = vqa_accuracy(model, questions)
    assert model.prompts == [["is there a red shape?", "is there a blue shape?"]] and plain["yes/no"] == 0.5
    model.prompts.clear()
    described = vqa_accuracy(model, questions, protocol=DESCRIBE)
    assert model.prompts == [[CAPTION_PROMPT] * 2, [described_question("A red circle.", q.question) for q in questions]]
    assert model.prompts[1][0] == "The image shows a red circle. is there a red shape?"
    assert described["yes/no"] == 0.5  # "yes" to both: the stand-in ignores the question, the scoring does not



class ImageDescriber(Describer):
    """Describes each image by its name ("A red circle." for "red.png"); answers "yes" iff the description's colour
    is the question's, so a description given to the wrong question shows in the accuracy."""

    def __init__(self):
        super().__init__()
        self.described = []

    def generate(self, images, prompts, max_new_tokens, protocol=None):
        self.prompts.append(list(prompts))
        if prompts[0] == CAPTION_PROMPT:
            self.described += list(images)
            return [f"A {str(image).removesuffix('.png')} circle." for image in images]
        return ["yes" if p.split()[4] == p.split()[-2] else "no" for p in prompts]  # "...shows a red ... red shape?"


def test_describe_first_describes_each_distinct_image_once_and_gives_each_question_its_own_description():
    colours = ("red", "blue", "red", "green", "blue", "red")
    questions = [Question(f"is there a {c} shape?", "yes", f"{c}.png", "yes/no") for c in colours]
    model = ImageDescriber()
    accuracy = vqa_accuracy(model, questions, batch_size=4, protocol=DESCRIBE)
    assert model.described == ["red.png", "blue.png", "green.png"] and accuracy["yes/no"] == 1.0
    # the same image asked the same question is one input, answered once and scored for every question
    assert model.prompts[1] == [f"The image shows a {c} circle. is there a {c} shape?"
                                for c in ("red", "blue", "green")]
    assert accuracy.total["yes/no"] == 6 and len(accuracy.examples) == 6

    model = ImageDescriber()
    grey = object()
    accuracy = vqa_accuracy(model, questions, batch_size=4, replace_image=grey, protocol=DESCRIBE)
    assert model.described == [grey]  # one grey image, described once, for every question


def test_each_distinct_input_is_answered_once_and_every_question_gets_its_answer():
    questions = [Question(f"is there a {c} shape?", "yes" if c == "red" else "no", "red.png", "yes/no")
                 for c in ("red", "blue", "red", "blue", "red")]
    questions.append(Question("is there a red shape?", "yes", "blue.png", "yes/no"))  # same text, other image
    model = ImageDescriber()
    accuracy = vqa_accuracy(model, questions, batch_size=2, protocol=DESCRIBE)
    answered = [p for batch in model.prompts if batch[0] != CAPTION_PROMPT for p in batch]
    assert answered == ["The image shows a red circle. is there a red shape?",
                        "The image shows a red circle. is there a blue shape?",
                        "The image shows a blue circle. is there a red shape?"]
    assert [given for _, _, given in accuracy.examples] == ["yes", "no", "yes", "no", "yes", "no"]
    assert accuracy["yes/no"] == 5 / 6  # the blue image's "no" to "is there a red shape?" is scored against "yes"

    model = ImageDescriber()
    grey = object()
    accuracy = vqa_accuracy(model, questions, batch_size=2, replace_image=grey, protocol=DESCRIBE)
    answered = [p for batch in model.prompts if batch[0] != CAPTION_PROMPT for p in batch]
    assert len(answered) == 2 and accuracy.total["all"] == 6  # two question texts, one grey image
