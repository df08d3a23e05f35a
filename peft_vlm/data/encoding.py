"""Samples -> token ids, labels and pixels, with the checks that keep a bad row from being trained on silently.

A sample `{"messages", "images", "source"}` becomes `{"input_ids", "labels", "pixel_values", "source",
"truncated"}`. Labels are IGNORE_INDEX everywhere except the assistant answers (each ending in EOS). Each piece of
the conversation is tokenized on its own, so answer boundaries are token boundaries by construction; then every
answer's labelled tokens are decoded and must give back the answer text. LLaVA's known silent failure (labels
shifted against the text, the sample then trained with all labels ignored) is reported here as
"misaligned tokenization" instead. A sample cut so short by `max_length` that no answer token is left is "too long";
one that keeps part of an answer is trained on and flagged `truncated`.

`VisionLanguageModel.tokenize` and `generate` encode their prompts here too (`generation=True`: the sample ends with
a user turn and the ids end with the assistant's generation prompt), so inference sees the training template.
"""
from __future__ import annotations

from typing import Any

import torch

from peft_vlm.data.images import ImageProcessor
from peft_vlm.data.report import MISALIGNED, NO_ANSWER, TOO_LONG, WRONG_SCHEMA
from peft_vlm.errors import ConfigError, DataError
from peft_vlm.data.prompting import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    IMAGE_TOKEN_ID,
    conversation_segments,
    marked_as_typed,
    tokenize_with_images,
    typed_pattern,
    with_placeholders,
)

ROLES = ("system", "user", "assistant")


class SampleEncoder:
    """Turns samples into training examples for one tokenizer and vision tower. Raises DataError for a bad row."""

    def __init__(self, tokenizer, tokens_per_image: int, image_processor: ImageProcessor | None = None,
                 max_length: int | None = None, use_chat_template: bool = True, check_alignment: bool = True,
                 image_boundaries: tuple[str, str] | None = None):
        if max_length is not None and max_length < 1:
            raise ConfigError(f"max_length={max_length} must be a positive number of tokens")
        self.tokenizer = tokenizer
        self.tokens_per_image = tokens_per_image
        self.image_processor = image_processor
        self.max_length = max_length
        self.use_chat_template = use_chat_template
        self.check_alignment = check_alignment
        self.image_boundaries = image_boundaries
        self.typed = typed_pattern(tokenizer)  # what a user types that the tokenizer would read as special tokens

    @classmethod
    def for_model(cls, model, resize: str | None = None, max_length: int | None = None, **options) -> "SampleEncoder":
        """Match a VisionLanguageModel: its tokenizer, template choice, visual tokens per image and image processor.
        `resize` (default: the model's own `model.resize`) also becomes the model's, so that the model remembers
        the resize mode of the data it is trained on and `generate` preprocesses the same way. `max_length`
        defaults to the language model's context length."""
        if hasattr(model, "sample_encoder"):  # a wrapped transformers VLM encodes through its own processor
            return model.sample_encoder(resize=resize or "resize", max_length=max_length, **options)
        if resize is not None:
            model.resize = resize
        max_length = max_length or getattr(model.config, "max_position_embeddings", None)
        options.setdefault("use_chat_template", model.use_chat_template)
        options.setdefault("image_boundaries", getattr(model, "image_boundaries", None))
        return cls(model.tokenizer, model.tokens_per_image, model.image_processor, max_length, **options)

    def __call__(self, sample: dict, generation: bool = False) -> dict:
        encoded = self.encode_text(sample, generation)
        images = list(sample.get("images") or [])[: encoded.pop("num_images")]
        encoded["pixel_values"] = torch.stack([self.pixels(i, encoded["source"]) for i in images]) if images else None
        return encoded

    def pixels(self, image: Any, source: str) -> torch.Tensor:
        """One image (path, PIL image, HWC uint8 array, or an already preprocessed (3, H, W) tensor) as pixels."""
        if isinstance(image, torch.Tensor):
            if image.dim() != 3:
                raise ConfigError(f"{source}: a preprocessed image is a (3, H, W) tensor, got {tuple(image.shape)}")
            return image
        if self.image_processor is None:
            raise ConfigError("this encoder has no image processor; build it with SampleEncoder.for_model(model)")
        return self.image_processor(image, source)

    # -- text -------------------------------------------------------------------------------------------------------
    def encode_text(self, sample: dict, generation: bool = False) -> dict:
        """Token ids and labels without loading images (cheap enough to check a whole dataset). `generation`: the
        sample is a prompt (no answer needed) and ends with the generation prompt; it is not truncated."""
        source = str(sample.get("source", "sample"))
        messages = _checked_messages(sample, source, needs_answer=not generation)
        messages = [m if m["role"] == "assistant" else {**m, "content": marked_as_typed(m["content"], self.typed)}
                    for m in messages]
        try:
            segments = conversation_segments(self.tokenizer, messages, self.use_chat_template, generation)
        except Exception as error:  # a template's own checks (role order, ...) raise jinja errors or ValueError
            raise DataError(source, MISALIGNED, f"chat template: {error}") from None
        contents = iter([m["content"] for m in messages if m["role"] == "assistant"])
        ids, labels, answers = [], [], []
        for text, is_answer in segments:
            piece = tokenize_with_images(self.tokenizer, text, self.tokens_per_image, add_special_tokens=not ids
                                         and not text.startswith(self.tokenizer.bos_token or "\0"),
                                         boundaries=self.image_boundaries)
            if is_answer:
                if not piece or piece[-1] != self.tokenizer.eos_token_id:
                    piece.append(self.tokenizer.eos_token_id)
                answers.append((len(ids), len(ids) + len(piece), next(contents)))
            ids += piece
            labels += piece if is_answer else [IGNORE_INDEX] * len(piece)
        if self.check_alignment:
            self._check_alignment(ids, answers, source)
        ids, labels, truncated = (ids, labels, False) if generation else self._truncate(ids, labels, source)
        # images that take no positions (a method feeds them to the LM itself) are never truncated away
        num_images = (ids.count(IMAGE_TOKEN_ID) // self.tokens_per_image if self.tokens_per_image
                      else len(sample.get("images") or []))
        return {"input_ids": ids, "labels": labels, "source": source, "truncated": truncated, "num_images": num_images}

    def _check_alignment(self, ids: list[int], answers: list[tuple[int, int, str]], source: str) -> None:
        for number, (start, end, text) in enumerate(answers, start=1):
            decoded = self.tokenizer.decode(ids[start:end], skip_special_tokens=True)
            if _words(text) not in _words(decoded):
                raise DataError(source, MISALIGNED,
                                f"answer {number}: labelled tokens decode to {decoded!r}, expected {text!r}")

    def _truncate(self, ids: list[int], labels: list[int], source: str) -> tuple[list[int], list[int], bool]:
        if self.max_length is None or len(ids) <= self.max_length:
            return ids, labels, False
        cut = self.max_length
        while cut > 0 and ids[cut] == IMAGE_TOKEN_ID and ids[cut - 1] == IMAGE_TOKEN_ID:
            cut -= 1  # never keep part of an image: its visual tokens come as one block
        if all(label == IGNORE_INDEX for label in labels[:cut]):
            raise DataError(source, TOO_LONG, f"{len(ids)} tokens, max_length={self.max_length}")
        return ids[:cut], labels[:cut], True


def _words(text: str) -> str:
    return " ".join(text.split())


def _checked_messages(sample: Any, source: str, needs_answer: bool = True) -> list[dict]:
    """The sample's messages, with image placeholders matching its images (LLaVA layout when there are none)."""
    messages = sample.get("messages") if isinstance(sample, dict) else None
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages
    ):
        raise DataError(source, WRONG_SCHEMA, "messages must be a list of {role: system/user/assistant, content: str}")
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    if (needs_answer and not answers) or not all(answer.strip() for answer in answers):
        raise DataError(source, NO_ANSWER, "no assistant message" if not answers else "an assistant message is empty")
    if any(m["role"] == "assistant" and IMAGE_PLACEHOLDER in m["content"] for m in messages):
        raise DataError(source, WRONG_SCHEMA, f"an assistant message contains {IMAGE_PLACEHOLDER}")
    images = sample.get("images") or []
    placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if images and not placeholders:
        first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
        if first_user is None:
            raise DataError(source, WRONG_SCHEMA, "images but no user message to put them in")
        messages = list(messages)
        messages[first_user] = {**messages[first_user],
                                "content": with_placeholders(messages[first_user]["content"], len(images))}
    elif placeholders != len(images):
        raise DataError(
            source, WRONG_SCHEMA, f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} image(s)"
        )
    return messages
