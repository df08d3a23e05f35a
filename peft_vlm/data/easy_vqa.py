"""easy-VQA (PyPI `easy-vqa`) as training data: 64x64 images of one coloured shape, questions with 13 one-word answers.

- `instruction_samples(split, type_weights=...)`: each question as a user turn about its image, the answer as the
  assistant turn; `type_weights` resamples question types (e.g. {"yes/no": 0.25}: three in four yes/no questions
  are left out, so that more of a short run's steps ask for a colour or a shape, the answers that need the image).
- `caption_samples(split)`: "A red circle." per image. easy-VQA ships no captions, so colour and shape are
  read from the image's own questions: an open question answered with a colour or shape gives it directly (and
  names the other attribute in its text: "what color is the circle?"), a yes/no question states that a colour
  or shape is present or absent, and when all but one candidate is ruled out the last one is it. Images whose
  colour or shape stays unknown get no caption (about 11%); `annotations` tells which.
- `question_type(question)`: "color", "shape" or "yes/no", for per-type evaluation.
- `text_only_ceiling()`: accuracy of answering each test question with the most common training answer to the same
  question text, i.e. what a model that never looks at the image can reach.
"""
from __future__ import annotations

import random
import re
from functools import lru_cache
from collections import Counter, defaultdict
from typing import NamedTuple

from peft_vlm.data.formats import SampleList, caption_messages
from peft_vlm.errors import ConfigError
from peft_vlm.data.answer_protocol import described_question
from peft_vlm.data.prompting import IMAGE_PLACEHOLDER

COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
QUESTION_TYPES = ("color", "shape", "yes/no")
SPLITS = ("train", "test")


class Question(NamedTuple):
    text: str
    answer: str
    image_id: int
    image: str  # path of the PNG


def _easy_vqa():
    try:
        import easy_vqa
    except ImportError:
        raise ConfigError("easy-VQA data needs the easy-vqa package: pip install 'peft_vlm[demo]'") from None
    return easy_vqa


@lru_cache(maxsize=None)
def questions(split: str) -> tuple[Question, ...]:
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is not an easy-VQA split; use one of {', '.join(SPLITS)}")
    easy_vqa = _easy_vqa()
    texts, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
    paths = getattr(easy_vqa, f"get_{split}_image_paths")()
    return tuple(Question(t, a, i, paths[i]) for t, a, i in zip(texts, answers, image_ids))


def question_type(question: str) -> str:
    """easy-VQA's templates: yes/no questions start with "is"/"does"; open ones ask for a color or a shape."""
    first = question.split(maxsplit=1)[0].lower() if question.strip() else ""
    if first in ("is", "does", "are"):
        return "yes/no"
    return "color" if re.search(r"\bcolou?r\b", question.lower()) else "shape"


def instruction_samples(split: str, limit: int | None = None, type_weights: dict[str, float] | None = None,
                        seed: int = 0, balance_yes_no: bool = False, describe_first: bool = False,
                        negated_weight: float = 1.0) -> SampleList:
    """One sample per question (the first `limit`). `type_weights` maps a question type to how many copies of each
    of its questions to keep: 0.25 keeps a seeded quarter, 2 doubles them, 1.5 doubles a seeded half; types not
    named keep weight 1. Three in four questions are yes/no and say little about the image, so a short run learns
    more from a mix weighted towards colour and shape questions.

    `balance_yes_no` resamples the yes/no questions so that each question text is answered "yes" as often as "no"
    (the text's count kept): the text alone then says nothing (text-only accuracy 50% instead of 82.5% on the
    unbalanced data), so the answer has to come from the image.

    `describe_first` gives the true description of the image as text before every question (`described_question`:
    "The image shows a red circle. is there ..."), to train describe-then-answer: evaluate with `eval.describe_first`,
    where the model's own description of the image takes its place. The description says what the image's questions
    decide ("A red shape." when they leave the shape open); the 0.4% of questions on images that they leave wholly
    open are left out.

    `negated_weight` weights the yes/no questions that ask about absence ("is no red shape present?", half of
    them), as `type_weights` does (0: none, for the first stage of a curriculum). Balanced, the answer is "the
    question names the image's colour or shape" flipped by the negation, a parity of the two: with as many negated
    questions as plain ones, neither the comparison alone nor the negation alone predicts the answer, so the
    gradient has no first-order signal to start from (benchmarks/VISION_LEVERS.md, one pass)."""
    weights = dict(type_weights or {})
    if not 0 <= negated_weight:
        raise ConfigError(f"negated_weight={negated_weight} must be a non-negative number")
    unknown = sorted(set(weights) - set(QUESTION_TYPES))
    if unknown or any(w < 0 for w in weights.values()):
        raise ConfigError(f"type_weights={weights} needs non-negative weights for types among "
                          f"{', '.join(QUESTION_TYPES)}")
    draw = random.Random(seed)
    chosen = questions(split)[:limit]
    balance = _answer_balance(chosen) if balance_yes_no else {}
    described = annotations(split) if describe_first else {}
    samples = []
    for number, q in enumerate(chosen, start=1):
        text = q.text
        if describe_first:
            if (description := describe(*described[q.image_id])) is None:
                continue
            text = described_question(description, q.text)
        weight = weights.get(question_type(q.text), 1.0) * balance.get((q.text, q.answer), 1.0)
        if question_type(q.text) == "yes/no" and is_negated(q.text):
            weight *= negated_weight
        copies = int(weight) + (draw.random() < weight - int(weight))
        samples += [{"messages": [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{text}"},
                                  {"role": "assistant", "content": q.answer}],
                     "images": [q.image], "source": f"easy-vqa {split}:question {number}"}] * copies
    return SampleList(samples)


def _answer_balance(chosen) -> dict[tuple[str, str], float]:
    """(question text, answer) -> weight that gives every yes/no text as many "yes" as "no" answers, its count kept;
    a text answered one way only keeps weight 1 (nothing to balance it with)."""
    counts = Counter((q.text, q.answer) for q in chosen if question_type(q.text) == "yes/no")
    weights = {}
    for (text, answer), count in counts.items():
        yes, no = counts.get((text, "yes"), 0), counts.get((text, "no"), 0)
        weights[(text, answer)] = (yes + no) / (2 * count) if yes and no else 1.0
    return weights


def annotations(split: str) -> dict[int, tuple[str | None, str | None]]:
    """image id -> (color, shape) derived from the image's questions; None where the questions do not decide it."""
    present, absent, image_ids = defaultdict(set), defaultdict(set), set()
    for q in questions(split):
        named, negated = _attributes_named(q.text)
        if q.answer in COLORS or q.answer in SHAPES:
            present[q.image_id] |= named | {q.answer}
        else:
            (present if (q.answer == "yes") != negated else absent)[q.image_id] |= named
        image_ids.add(q.image_id)

    def decide(candidates, image_id):
        known = ([c for c in candidates if c in present[image_id]]
                 or [c for c in candidates if c not in absent[image_id]])
        return known[0] if len(known) == 1 else None

    return {i: (decide(COLORS, i), decide(SHAPES, i)) for i in sorted(image_ids)}


@lru_cache(maxsize=None)
def _attributes_named(text: str) -> tuple[frozenset, bool]:
    """(colors and shapes the question names, whether it asks about absence: "is there not a ...", "is no ...")."""
    words = set(re.findall(r"[a-z]+", text.lower()))
    return frozenset(words & {*COLORS, *SHAPES}), bool(words & {"not", "no"})


def is_negated(question: str) -> bool:
    """Whether a yes/no question asks about absence ("is no red shape present?", "does the image not contain ...")."""
    return _attributes_named(question)[1]


def describe(color: str | None, shape: str | None) -> str | None:
    """"A red circle.", "A red shape." or "A circle." (None when neither is known): the caption's words."""
    if shape is None:
        return f"A {color} shape." if color else None
    return f"A {color} {shape}." if color else f"A {shape}."


def caption_samples(split: str) -> SampleList:
    """"A red circle." for every image whose color and shape its questions decide."""
    paths = getattr(_easy_vqa(), f"get_{split}_image_paths")()
    samples = [
        caption_messages(paths[image_id], describe(color, shape), f"easy-vqa {split}:image {image_id}")
        for image_id, (color, shape) in annotations(split).items() if color and shape
    ]
    return SampleList(samples)


def text_only_ceiling(train: str = "train", test: str = "test") -> dict[str, float]:
    """Accuracy, overall and per question type, of the most common `train` answer to the same question text on
    `test`; a text never seen in training gets the most common training answer of its question type."""
    by_text, by_type = defaultdict(Counter), defaultdict(Counter)
    for q in questions(train):
        by_text[q.text][q.answer] += 1
        by_type[question_type(q.text)][q.answer] += 1
    correct, total = Counter(), Counter()
    for q in questions(test):
        kind = question_type(q.text)
        guess = (by_text.get(q.text) or by_type[kind]).most_common(1)[0][0]
        for key in ("all", kind):
            total[key] += 1
            correct[key] += guess == q.answer
    return {key: correct[key] / total[key] for key in total}
