"""Per-call visual inputs: token types (text or image per position) and the images' tokens, as one typed value.

The vision-language model (or a user, through `token_types`) announces the `VisualInputs` of the call it is about
to run; a forward pre-hook on the language model activates their token types for a call whose (batch, length)
matches and clears them otherwise. During cached generation the prompt is one call that matches and every later
step (new text tokens) does not, so methods see image positions in the prefill and plain text afterwards, without
any change to the language model's own code. The images' tokens stay available for the whole call.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from peft_vlm.errors import ConfigError
from peft_vlm.runtime.tracking import state_of

TEXT, IMAGE = 0, 1
IMAGE_FIELDS = ("patch_tokens", "visual_tokens", "image_owner")


@dataclass(frozen=True)
class VisualInputs:
    """What one call gives the methods besides its embeddings. Without images (a text-only call) the three image
    fields are None; `token_types` may still mark positions (a bare LM run through `token_types`)."""

    patch_tokens: torch.Tensor | None = None  # (images, patches, vision width), from the vision tower
    visual_tokens: torch.Tensor | None = None  # (images, tokens, hidden), from the connector
    image_owner: torch.Tensor | None = None  # (images,) the batch row each image belongs to, in reading order
    token_types: torch.Tensor | None = None  # (batch, length) TEXT / IMAGE of the prompt call; None: all text
    # A packed call (several samples per row, `peft_vlm.runtime.packing`): the sample of each position (-1: padding)
    # and of each image. None: one sample per row.
    sequence_ids: torch.Tensor | None = None
    image_sequences: torch.Tensor | None = None

    def __post_init__(self):
        images = [getattr(self, name) for name in IMAGE_FIELDS if getattr(self, name) is not None]
        if images and self.image_owner is None:
            raise ConfigError("VisualInputs: image tokens need image_owner, the batch row of each image")
        if any(len(tensor) != len(images[0]) for tensor in images):
            counts = ", ".join(
                f"{name}={len(getattr(self, name))}" for name in IMAGE_FIELDS if getattr(self, name) is not None
            )
            raise ConfigError(
                f"VisualInputs: patch_tokens, visual_tokens and image_owner give one entry per image, got {counts}"
            )

    @property
    def has_images(self) -> bool:
        return self.image_owner is not None

    @property
    def tokens_per_image(self) -> int | None:
        """Visual tokens per image (what tells adjacent images apart in `token_types`), None without them."""
        return None if self.visual_tokens is None else self.visual_tokens.shape[1]


@dataclass
class RoutingContext:
    # The visual inputs of the whole call (the prompt and every cached decoding step), set by the vision-language
    # model from `_embed` or by `token_types`.
    visual: VisualInputs = field(default_factory=VisualInputs)
    token_types: torch.Tensor | None = None  # token types of the language-model call running now, or None: all text
    # Functions (context, kwargs) -> None that may rewrite the language model's call arguments (e.g. position_ids)
    # after the token types of the call are known. Methods append to this list when they attach.
    call_transforms: list[Callable[["RoutingContext", dict], None]] = field(default_factory=list)

    @property
    def announced(self) -> torch.Tensor | None:
        """(batch, length) token types of the next matching call."""
        return self.visual.token_types

    @property
    def extras(self) -> MutableMapping:
        """The image fields of `visual` as a mapping: the form of earlier releases, kept for code that reads or sets
        `extras["visual_tokens"]`; new code reads `context.visual`."""
        return _ExtrasView(self)

    @extras.setter
    def extras(self, values: dict) -> None:
        self.visual = VisualInputs(token_types=self.visual.token_types, **_image_fields(values))

    def types_for(self, shape: tuple[int, int]) -> torch.Tensor | None:
        """The running call's token types if they cover `shape` (batch, length); None when the call is all text or
        is another one (a cached decoding step)."""
        types = self.token_types
        return types if types is not None and tuple(types.shape) == tuple(shape) else None


def _image_fields(values: dict) -> dict:
    unknown = sorted(set(values) - set(IMAGE_FIELDS))
    if unknown:
        raise ConfigError(f"unknown visual input(s) {', '.join(unknown)}; known: {', '.join(IMAGE_FIELDS)}")
    return dict(values)


class _ExtrasView(MutableMapping):
    """`context.extras` of earlier releases: a live view of the image fields of `context.visual`."""

    def __init__(self, context: RoutingContext) -> None:
        self.context = context

    def __getitem__(self, key: str) -> torch.Tensor:
        value = getattr(self.context.visual, key, None) if key in IMAGE_FIELDS else None
        if value is None:
            raise KeyError(key)
        return value

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self.context.visual = dataclasses.replace(self.context.visual, **_image_fields({key: value}))

    def __delitem__(self, key: str) -> None:
        self[key]  # KeyError when absent
        self.context.visual = dataclasses.replace(self.context.visual, **{key: None})

    def __iter__(self) -> Iterator[str]:
        return (name for name in IMAGE_FIELDS if getattr(self.context.visual, name) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _call_shape(args: tuple, kwargs: dict) -> torch.Size | None:
    for tensor in (kwargs.get("inputs_embeds"), kwargs.get("input_ids"), args[0] if args else None):
        if isinstance(tensor, torch.Tensor):
            return tensor.shape[:2]
    return None


def install(model: nn.Module, language_model: nn.Module) -> RoutingContext:
    """Give `model`'s adapter state a routing context fed by a pre-hook on `language_model` (idempotent)."""
    state = state_of(model)
    if state.context is None:
        context = RoutingContext()

        def activate(module, args, kwargs):
            announced = context.announced
            context.token_types = (
                announced if announced is not None and announced.shape == _call_shape(args, kwargs) else None
            )
            for transform in context.call_transforms:
                transform(context, kwargs)
            return args, kwargs

        language_model.register_forward_pre_hook(activate, with_kwargs=True)
        state.context = context
    return state.context


@contextlib.contextmanager
def token_types(model: nn.Module, types: torch.Tensor | VisualInputs | None, **images: torch.Tensor):
    """Run `model` (a language model with methods applied, or a VisionLanguageModel) with the given visual inputs.

    `types` is a `VisualInputs`, or the (batch, length) token types alone; then the images' tokens may come as
    keywords (`patch_tokens=`, `visual_tokens=`, `image_owner=`), the form of earlier releases."""
    context = state_of(model).context
    if context is None:
        raise RuntimeError("token_types() needs a model that has methods applied with pv.apply")
    if isinstance(types, VisualInputs):
        if images:
            raise ConfigError("token_types(): pass the images' tokens inside the VisualInputs, not as keywords too")
        visual = types
    else:
        visual = VisualInputs(token_types=types, **_image_fields(images))
    previous, context.visual = context.visual, visual
    try:
        yield context
    finally:
        context.visual = previous
