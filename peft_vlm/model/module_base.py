"""What the vision-language models here share (built from parts, or a wrapped transformers VLM)."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from peft_vlm.data.answer_protocol import AnswerProtocol
from peft_vlm.errors import ConfigError


class VisionLanguageModule(nn.Module):
    """A `vision_tower` that stays in eval mode unless it trains, a `language_model` whose embeddings' device is
    where inputs go, and `generate`, which answers the way the model was trained to (`answer_protocol`).

    Subclasses provide `tokenize(prompts, images, chat=)` and `generate_ids(**batch, **generation_options)`."""

    # How the model answers (`peft_vlm.data.answer_protocol`): set by recipes before training, saved in adapter
    # files and restored by `pv.load_adapter`; None answers in one plain pass.
    answer_protocol: AnswerProtocol | None = None

    def _lm_device(self) -> torch.device:
        return self.language_model.get_input_embeddings().weight.device

    def train(self, mode: bool = True):
        super().train(mode)
        self.vision_tower.train(mode and any(p.requires_grad for p in self.vision_tower.parameters()))
        return self

    @torch.no_grad()
    def generate(
        self,
        images: Sequence[Any] | None = None,
        prompts: Sequence[str] | str | None = None,
        max_new_tokens: int | None = None,
        chat: bool | None = None,
        protocol: AnswerProtocol | bool | None = None,
        **generation_options,
    ) -> list[str]:
        """Answer each prompt about its image(s) (paths or PIL images, see `tokenize`), prepared as in training.

        `protocol`: how to answer; by default the model's `answer_protocol` (what its adapter file recorded: say,
        describe the image first, then answer after the description), `False` for one plain pass. With an
        `answer_after` marker the answer returned is what follows it. `max_new_tokens` defaults to the protocol's
        (32 without one)."""
        if prompts is None:
            raise ConfigError("generate() needs prompts=")
        if isinstance(prompts, str):
            prompts, images = [prompts], None if images is None else [images]
        protocol = self.answer_protocol if protocol is None or protocol is True else protocol or None
        if max_new_tokens is None:
            max_new_tokens = protocol.max_new_tokens if protocol else 32
        prompts = list(prompts)
        if protocol and protocol.describe_first and images is not None:
            pictured = [i for i, image in enumerate(images)
                        if image is not None and not (isinstance(image, (list, tuple)) and not image)]
            describe = [protocol.describe_prompt] * len(pictured)
            descriptions = self._generate_text([images[i] for i in pictured], describe,
                                               protocol.describe_max_new_tokens, chat, **generation_options)
            for i, description in zip(pictured, descriptions):
                prompts[i] = protocol.question_after(description, prompts[i])
        answers = self._generate_text(images, prompts, max_new_tokens, chat, **generation_options)
        return [protocol.answer_in(answer) for answer in answers] if protocol else answers

    def _generate_text(self, images, prompts, max_new_tokens: int, chat: bool | None, **generation_options):
        if not prompts:
            return []
        batch = self.tokenize(prompts, images, chat=chat)
        output_ids = self.generate_ids(**batch, max_new_tokens=max_new_tokens, **generation_options)
        return self.tokenizer.batch_decode(output_ids, skip_special_tokens=True)
