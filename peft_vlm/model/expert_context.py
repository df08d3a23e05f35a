"""Expert context (LLaMA-Adapter V2, arXiv 2304.15010 sec 4.4): at inference, text that an external expert produces
about each image (a caption, OCR, detected objects) is added to the prompt, so a small adapter can lean on a
stronger system's reading of the image without any training.

The expert is any callable `expert(image) -> str` (a captioning model, an OCR engine, a lambda over stored
annotations). Its text goes after the image placeholders at the front of the prompt (LLaVA's layout) or, for a
prompt with images elsewhere, in front of the prompt.

    answers = generate_with_expert(model, images=[img], prompts=["What does the sign say?"], expert=ocr)
"""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence

from peft_vlm.errors import ConfigError
from peft_vlm.data.prompting import IMAGE_PLACEHOLDER, with_placeholders

DEFAULT_TEMPLATE = "Image context: {text}\n"
_LEADING_PLACEHOLDERS = re.compile(rf"^(?:{re.escape(IMAGE_PLACEHOLDER)}\s*)+")


def _images_of(entry: Any) -> list:
    if entry is None:
        return []
    return list(entry) if isinstance(entry, (list, tuple)) else [entry]


def expert_texts(images: Any, expert: Callable[[Any], str]) -> list[str]:
    """The expert's non-empty texts for one prompt's image(s); anything but a string is a ConfigError."""
    texts = []
    for index, image in enumerate(_images_of(images)):
        text = expert(image)
        if not isinstance(text, str):
            raise ConfigError(f"the expert returned {type(text).__name__} for image #{index}; it must return text")
        if text.strip():
            texts.append(text.strip())
    return texts


def with_expert_context(
    prompts: Sequence[str], images: Sequence[Any] | None, expert: Callable[[Any], str], template: str = DEFAULT_TEMPLATE
) -> list[str]:
    """Each prompt with its images' expert text added as context (`template` with `{text}`); prompts without images
    or with empty expert text stay as they are. `images[i]` is None, one image or a list, as in `generate`."""
    images = list(images) if images is not None else [None] * len(prompts)
    if len(images) != len(prompts):
        raise ConfigError(f"{len(prompts)} prompts but {len(images)} image entries")
    result = []
    for prompt, own in zip(prompts, images):
        texts = expert_texts(own, expert)
        if not texts:
            result.append(prompt)
            continue
        prompt = with_placeholders(prompt, len(_images_of(own)))
        context = template.format(text=" ".join(texts))
        lead = _LEADING_PLACEHOLDERS.match(prompt)
        cut = lead.end() if lead else 0
        result.append(prompt[:cut] + context + prompt[cut:])
    return result


def generate_with_expert(model, images: Sequence[Any] | None, prompts: Sequence[str], expert: Callable[[Any], str],
                         template: str = DEFAULT_TEMPLATE, **generation_options) -> list[str]:
    """`model.generate` on the prompts with the expert's context added."""
    return model.generate(
        images=images, prompts=with_expert_context(prompts, images, expert, template), **generation_options
    )
