"""easy-VQA as instruction and caption data (needs the `demo` extra)."""
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("easy_vqa")

from peft_vlm.data import ImageProcessor, SampleDataset, SampleEncoder  # noqa: E402
from peft_vlm.data import easy_vqa as ev  # noqa: E402
from peft_vlm.data.prompting import IGNORE_INDEX  # noqa: E402

PIXEL_COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "black": (0, 0, 0),
                "gray": (128, 128, 128), "teal": (0, 128, 128), "brown": (165, 42, 42), "yellow": (255, 255, 0)}


def test_question_type_agrees_with_the_kind_of_answer_on_every_test_question():
    def kind(answer):
        return "yes/no" if answer in ("yes", "no") else "color" if answer in ev.COLORS else "shape"

    assert all(ev.question_type(q.text) == kind(q.answer) for q in ev.questions("test"))


def test_instruction_samples_ask_each_question_about_its_image():
    samples = ev.instruction_samples("test", limit=3)
    first = ev.questions("test")[0]
    assert len(samples) == 3
    assert samples[0]["messages"][0]["content"] == f"<image>\n{first.text}"
    assert samples[0]["messages"][1]["content"] == first.answer
    assert samples[0]["images"] == [first.image] and samples[0]["source"] == "easy-vqa test:question 1"


def shape_color(path):
    """The second most common pixel colour (the first is the background)."""
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    colors, counts = np.unique(pixels, axis=0, return_counts=True)
    return tuple(colors[np.argsort(-counts)[1]].tolist())


def test_derived_caption_colors_match_the_shape_pixels():
    paths = {q.image_id: q.image for q in ev.questions("test")}
    decided = [(i, color) for i, (color, _) in list(ev.annotations("test").items())[:40] if color]
    assert len(decided) > 30
    assert all(shape_color(paths[i]) == PIXEL_COLORS[color] for i, color in decided)


def test_caption_samples_describe_color_and_shape_of_images_whose_questions_decide_both():
    samples = ev.caption_samples("test")
    decided = sum(1 for color, shape in ev.annotations("test").values() if color and shape)
    assert len(samples) == decided > 800
    caption = samples[0]["messages"][1]["content"]
    color, shape = caption[2:-1].split()
    assert color in ev.COLORS and shape in ev.SHAPES


def test_text_only_ceiling_is_a_per_type_accuracy_above_chance_for_yes_no():
    ceiling = ev.text_only_ceiling()
    assert set(ceiling) == {"all", *ev.QUESTION_TYPES}
    assert 0.5 < ceiling["yes/no"] < 1 and 0 < ceiling["color"] < ceiling["all"] < 1


def test_easy_vqa_samples_encode_with_labels_on_the_one_word_answer(tokenizer):
    encoder = SampleEncoder(tokenizer, 4, ImageProcessor(32))
    example = SampleDataset(ev.instruction_samples("test", limit=2), encoder)[0]
    answer = ev.questions("test")[0].answer
    labels = [label for label in example["labels"] if label != IGNORE_INDEX]
    assert tokenizer.decode(labels, skip_special_tokens=True) == answer
    assert example["pixel_values"].shape == (1, 3, 32, 32)


def test_type_weights_resample_question_types_reproducibly():
    def kind(sample):
        return ev.question_type(sample["messages"][0]["content"].split("\n", 1)[1])

    kinds = [kind(s) for s in ev.instruction_samples("test", limit=400).samples]
    weighted = ev.instruction_samples("test", limit=400, type_weights={"yes/no": 0.25, "shape": 2})
    counts = {k: sum(kind(s) == k for s in weighted.samples) for k in ev.QUESTION_TYPES}
    assert counts["color"] == kinds.count("color") and counts["shape"] == 2 * kinds.count("shape")
    assert 0.15 < counts["yes/no"] / kinds.count("yes/no") < 0.35
    again = ev.instruction_samples("test", limit=400, type_weights={"yes/no": 0.25, "shape": 2})
    assert [s["source"] for s in again.samples] == [s["source"] for s in weighted.samples]
    with pytest.raises(ev.ConfigError):
        ev.instruction_samples("test", limit=4, type_weights={"colour": 2})


def test_describe_first_gives_the_true_description_before_the_question_and_it_implies_the_answer():
    notes, plain = ev.annotations("test"), ev.questions("test")
    samples = ev.instruction_samples("test", describe_first=True).samples
    kept = [q for q in plain if notes[q.image_id] != (None, None)]
    assert len(samples) == len(kept) < len(plain)
    checked = 0
    for sample, q in zip(samples, kept):
        prompt, answer = (m["content"] for m in sample["messages"])
        description = ev.describe(*notes[q.image_id])
        assert prompt == f"<image>\nThe image shows a{description[1:]} {q.text}" and answer == q.answer
        if ev.question_type(q.text) != "yes/no":
            continue
        named, negated = ev._attributes_named(q.text)
        (attribute,) = named - {"shape"}
        color, shape = notes[q.image_id]
        if (color if attribute in ev.COLORS else shape) is not None:  # the description alone answers the question
            present = attribute in description.lower().rstrip(".").split()
            assert answer == ("yes" if present != negated else "no"), (q.text, description, answer)
            checked += 1
    assert checked > 100
    assert ev.describe(None, "circle") == "A circle." and ev.describe("red", None) == "A red shape."


def test_negated_weight_leaves_out_exactly_the_questions_about_absence():
    texts = [s["messages"][0]["content"].split("\n", 1)[1] for s in ev.instruction_samples("train", 4000).samples]
    kept = [s["messages"][0]["content"].split("\n", 1)[1]
            for s in ev.instruction_samples("train", 4000, negated_weight=0).samples]
    negated = [t for t in texts if ev.is_negated(t)]
    assert ev.is_negated("is no red shape present?") and ev.is_negated("does the image not contain a circle?")
    assert not ev.is_negated("is there a red shape?") and all(ev.question_type(t) == "yes/no" for t in negated)
    assert 0.4 < len(negated) / sum(ev.question_type(t) == "yes/no" for t in texts) < 0.6
    assert kept == [t for t in texts if not ev.is_negated(t)]
    with pytest.raises(ev.ConfigError, match="negated_weight"):
        ev.instruction_samples("train", 10, negated_weight=-1)
