"""How a trained model answers a question about an image: the part of its training that inference must repeat.

A model trained to describe the image and then answer after its own description (easy-VQA's `describe_first`, the
main recipe) answers badly when asked the plain way, and one trained to write its reasoning before "Answer:" is
scored on what follows the marker. `save_adapter` records the protocol in the adapter file (as transformers records
a generation config beside the weights), `load_adapter` restores it as `model.answer_protocol`, and
`model.generate`, `peft-vlm generate` and `peft-vlm eval` answer that way unless told otherwise.
"""
from __future__ import annotations

import dataclasses
import string
from dataclasses import dataclass
from typing import Any, Literal

from peft_vlm.data.formats import CAPTION_PROMPT
from peft_vlm.errors import ConfigError
from peft_vlm.options import check_options

# The question after the model's own description, as easy-VQA's `describe_first` trains it.
DESCRIBED_TEMPLATE = "The image shows {description} {question}"
PRECISIONS = ("auto", "bf16", "bf16-native", "no")


@dataclass(frozen=True)
class AnswerProtocol:
    """`describe_first`: two passes, the model describes the image (`describe_prompt`, up to
    `describe_max_new_tokens` tokens), then answers `template` filled with its description and the question.
    `answer_after`: the answer is what follows the last occurrence of this marker in the generation.
    `max_new_tokens`: tokens generated for an answer. `precision`: the training run's `mixed_precision` (evaluation
    runs under the same bf16 autocast on the CPU where training did)."""

    describe_first: bool = False
    describe_prompt: str = CAPTION_PROMPT
    describe_max_new_tokens: int = 12
    template: str = DESCRIBED_TEMPLATE
    answer_after: str | None = None
    max_new_tokens: int = 32
    precision: Literal["auto", "bf16", "bf16-native", "no", None] = None

    def __post_init__(self) -> None:
        check_options(AnswerProtocol, dataclasses.asdict(self), "AnswerProtocol")
        for name in ("max_new_tokens", "describe_max_new_tokens"):
            if not 1 <= getattr(self, name) <= 4096:
                raise ConfigError(f"AnswerProtocol: {name} must be an integer in [1, 4096], got {getattr(self, name)}")
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(self.template) if name is not None}
        except ValueError as error:
            raise ConfigError(f"AnswerProtocol: template {self.template!r} is not a format string ({error})") from None
        if fields != {"description", "question"}:
            raise ConfigError(f"AnswerProtocol: template must hold {{description}} and {{question}} and no other "
                              f"field, got {self.template!r}")
        if self.answer_after == "" or not self.describe_prompt.strip():
            raise ConfigError("AnswerProtocol: answer_after and describe_prompt must not be empty")

    @classmethod
    def from_dict(cls, values: Any, where: str = "answer protocol") -> "AnswerProtocol":
        """From `to_dict`'s output (an adapter file's metadata); a ConfigError names what does not fit."""
        check_options(cls, values, where)
        try:
            return cls(**values)
        except ConfigError as error:
            raise ConfigError(f"{where}: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def question_after(self, description: str, question: str) -> str:
        """The answer pass's prompt: "The image shows a red circle. is there a red shape?"."""
        return described_question(description, question, self.template)

    def answer_in(self, generated: str) -> str:
        """The answer in a generation: what follows the last `answer_after` marker (all of it when there is none
        or the marker is missing; scoring counts a missing marker as no answer)."""
        if self.answer_after and self.answer_after in generated:
            return generated.rsplit(self.answer_after, 1)[1].strip()
        return generated

    def describe(self) -> str:
        """One line for `peft-vlm info`."""
        passes = (f"two passes: describe ({self.describe_prompt!r}, {self.describe_max_new_tokens} tokens), then "
                  f"answer {self.template!r}" if self.describe_first else "one pass")
        after = f"; answer after {self.answer_after!r}" if self.answer_after else ""
        precision = f"; precision {self.precision}" if self.precision else ""
        return f"{passes}{after}; up to {self.max_new_tokens} new tokens{precision}"


def described_question(description: str, question: str, template: str = DESCRIBED_TEMPLATE) -> str:
    """The question after a description of its image, given as text: "The image shows a red circle. is there ...".
    Training on the true description and answering with the model's own (describe, then answer: two passes) lets
    the frozen model compare words with words, which it does well (benchmarks/VISION_LEVERS.md)."""
    description = description.strip()
    return template.format(description=description[:1].lower() + description[1:], question=question)
