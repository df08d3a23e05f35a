"""Evaluation: short-answer / multiple-choice VQA accuracy (exact match after normalisation), per question type and
with a neutral grey image in place of the real one, and loss/perplexity on labelled data."""
from __future__ import annotations

import math
import os
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from PIL import Image

from peft_vlm.data.answer_protocol import AnswerProtocol
from peft_vlm.data.prompting import IMAGE_PLACEHOLDER
from peft_vlm.data.report import WRONG_SCHEMA, Skipped
from peft_vlm.errors import DataError
from peft_vlm.model import vision_feature_cache

ARTICLES = {"a", "an", "the"}
GREY = (128, 128, 128)  # neutral: a black image is unlike anything in training and makes models babble


def normalize_answer(text: str) -> str:
    """The first line, lower case, without punctuation, articles and extra spaces (VQA's usual normalisation)."""
    text = text.strip().split("\n", 1)[0].lower()
    text = text.translate(str.maketrans("", "", string.punctuation))
    return " ".join(word for word in text.split() if word not in ARTICLES)


@dataclass
class Question:
    question: str
    answer: str
    image: object | None  # a path, a PIL image or None
    kind: str = "all"
    source: str = ""

    @classmethod
    def from_sample(cls, sample: dict, kind_of: Callable[[str], str] | None = None) -> "Question":
        """A sample as the data readers give it: its first user turn is the question, the assistant turn after it the
        answer (a system turn before them is not the question)."""
        messages = sample["messages"]
        asked = next((i for i, m in enumerate(messages) if m["role"] == "user"), len(messages))
        answer = next((m["content"] for m in messages[asked + 1:] if m["role"] == "assistant"), None)
        if answer is None:
            raise DataError(sample.get("source", "an eval row"), WRONG_SCHEMA,
                            "a question needs a user turn and an assistant turn after it")
        question = messages[asked]["content"].replace(IMAGE_PLACEHOLDER, "").strip()
        images = sample.get("images") or [None]
        kind = sample.get("kind") or (kind_of(question) if kind_of else "all")
        return cls(question, answer, images[0], kind, sample.get("source", ""))


@dataclass
class Accuracy:
    correct: Counter = field(default_factory=Counter)
    total: Counter = field(default_factory=Counter)
    examples: list[tuple[str, str, str]] = field(default_factory=list)  # (question, expected, answered)
    asked: int | None = None  # inputs the model was given: questions with one image and text share a greedy answer

    def add(self, kind: str, expected: str, answered: str, question: str, answer_after: str | None = None) -> None:
        """`answer_after`: the answer is what follows the last occurrence of this marker (none: no answer)."""
        answer = answered
        if answer_after:
            answer = answered.rsplit(answer_after, 1)[1] if answer_after in answered else ""
        hit = normalize_answer(answer) == normalize_answer(expected)
        for key in {"all", kind}:  # a question without a type is counted once
            self.total[key] += 1
            self.correct[key] += hit
        self.examples.append((question, expected, answered))

    def __getitem__(self, kind: str) -> float:
        return self.correct[kind] / self.total[kind] if self.total[kind] else float("nan")

    def as_dict(self) -> dict[str, float]:
        return {kind: self[kind] for kind in self.total}

    def __str__(self) -> str:
        return "  ".join(f"{kind} {100 * self[kind]:.1f}% ({self.total[kind]})" for kind in sorted(self.total))


@torch.no_grad()
def vqa_accuracy(
    model,
    questions: Sequence[Question],
    batch_size: int = 16,
    replace_image: Image.Image | None = None,
    progress: bool = False,
    protocol: AnswerProtocol | bool | None = None,
    cache_vision_features: bool | None = None,
) -> Accuracy:
    """Greedy answers to every question, answered the way `protocol` says (by default the model's
    `answer_protocol`, the one its adapter file recorded; `False`: one plain pass of up to 8 tokens).

    `replace_image` (e.g. `grey_image(model)`) stands in for every real image. A protocol with `describe_first`
    answers in two passes: the model describes the image, then answers the question with its description before it
    as text; each distinct image (path or object) is described once, however many questions ask about it. With
    `answer_after`, what follows that marker is scored (a missing marker is no answer). Each distinct input (image,
    prompt) is answered once, however many questions share it: greedy answers to the same input are the same (with
    `replace_image` every question sees one image, so a question text is answered once).

    `cache_vision_features`: where one image is asked about in several inputs (the describe pass and the answer
    pass, several questions), its frozen tower features are computed once (`vision_feature_cache.for_evaluation`):
    None uses the model's own cache (a training run's) or else one in memory for this call; True the cache on disk;
    False none."""
    if protocol is None or protocol is True:
        protocol = getattr(model, "answer_protocol", None)
    protocol = protocol or AnswerProtocol(max_new_tokens=8)
    model.eval()
    accuracy = Accuracy()
    images_of = [None if q.image is None else (replace_image or q.image) for q in questions]
    prompts = [q.question for q in questions]
    # an image asked about in several inputs (two passes, several questions) needs the tower once
    with_image = {(image_key(i), p) for i, p in zip(images_of, prompts) if i is not None}
    repeats = protocol.describe_first or len(with_image) > len({key for key, _ in with_image})
    with vision_feature_cache.for_evaluation(model, cache_vision_features, repeats):
        answer_of, inputs, distinct = _answers(model, images_of, prompts, batch_size, progress, protocol)
    accuracy.asked = len(distinct)
    for q, key in zip(questions, inputs):
        accuracy.add(q.kind, q.answer, answer_of[key], q.question, protocol.answer_after)
    return accuracy


def _answers(model, images_of, prompts, batch_size, progress, protocol):
    """(answer by distinct input, each question's input, the distinct inputs with their first question)."""
    if protocol.describe_first:
        descriptions = describe_images(model, images_of, batch_size, protocol)
        prompts = [p if i is None else protocol.question_after(descriptions[image_key(i)], p)
                   for i, p in zip(images_of, prompts)]
    inputs = [(image_key(image), prompt) for image, prompt in zip(images_of, prompts)]
    first_of: dict = {}
    for index, key in enumerate(inputs):
        first_of.setdefault(key, index)
    distinct = list(first_of.items())  # (input, its first question), in question order
    batches = range(0, len(distinct), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="evaluating", leave=False)
    answer_of = {}
    for start in batches:
        keys, indices = zip(*distinct[start : start + batch_size])
        answers = model.generate(images=[images_of[i] for i in indices], prompts=[prompts[i] for i in indices],
                                 max_new_tokens=protocol.max_new_tokens, protocol=False)  # paths open in generate
        answer_of.update(zip(keys, answers))
    return answer_of, inputs, distinct


def image_key(image) -> object:
    """What identifies an image across questions: its path, or the object itself (a PIL image, None)."""
    return str(image) if isinstance(image, (str, os.PathLike)) else id(image)


def describe_images(model, images: Sequence, batch_size: int, protocol: AnswerProtocol) -> dict[object, str]:
    """The model's description (the protocol's describe prompt, greedy) of each distinct image, by `image_key`."""
    distinct = list({image_key(image): image for image in images if image is not None}.items())
    descriptions = {}
    for start in range(0, len(distinct), batch_size):
        keys, chunk = zip(*distinct[start : start + batch_size])
        captions = model.generate(images=list(chunk), prompts=[protocol.describe_prompt] * len(chunk),
                                  max_new_tokens=protocol.describe_max_new_tokens, protocol=False)
        descriptions.update(zip(keys, captions))
    return descriptions


def grey_image(model) -> Image.Image:
    """A grey image at the tower's input size; a wrapped transformers VLM's processor resizes whatever it gets, so
    there the vision config's image size (or 224 where it has none, as Qwen2-VL's dynamic resolution) will do."""
    tower = model.vision_tower
    size = getattr(tower, "image_size", None) or getattr(getattr(tower, "config", None), "image_size", None) or 224
    return Image.new("RGB", (size, size) if isinstance(size, int) else tuple(size), GREY)


@torch.no_grad()
def perplexity(model, examples: Iterable, collate, batch_size: int = 8) -> dict[str, float]:
    """Mean loss over answer tokens (token-weighted) and its exponential."""
    model.eval()
    total_loss, total_tokens, batch = 0.0, 0, []

    def flush():
        nonlocal total_loss, total_tokens
        collated = collate(batch)
        if len(collated):
            tokens = collated.num_answer_tokens
            total_loss += model(**collated).loss.item() * tokens
            total_tokens += tokens
        batch.clear()

    for example in examples:
        if not isinstance(example, Skipped):
            batch.append(example)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    loss = total_loss / max(total_tokens, 1)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": total_tokens}


def multiple_choice_letter(text: str) -> str | None:
    """The chosen option of an answer like "The answer is (B)." or "B", or None."""
    match = re.search(r"answer is \(?([A-Z])\)?", text) or re.match(r"\s*\(?([A-Z])\)?(?:[.)\s]|$)", text)
    return match.group(1) if match else None
