"""Per-position token types (text or image) for the methods that treat image tokens differently.

The vision-language model (or a user, through `token_types`) announces the token types of the sequence it is about
to run; a forward pre-hook on the language model activates them for a call whose (batch, length) matches and clears
them otherwise. During cached generation the prompt is one call that matches and every later step (new text tokens)
does not, so methods see image positions in the prefill and plain text afterwards, without any change to the
language model's own code.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from peft_vlm.runtime.tracking import state_of

TEXT, IMAGE = 0, 1


@dataclass
class RoutingContext:
    announced: torch.Tensor | None = None  # (batch, length) token types of the next matching call
    token_types: torch.Tensor | None = None  # token types of the call running now, or None: all text
    # Set by the vision-language model for the whole call (prefill and every cached decoding step):
    # "patch_tokens" (images, patches, vision width) from the tower, "visual_tokens" (images, tokens, hidden) from
    # the connector, "image_owner" (images,) the batch row each image belongs to.
    extras: dict[str, Any] = field(default_factory=dict)
    # Functions (context, kwargs) -> None that may rewrite the language model's call arguments (e.g. position_ids)
    # after the token types of the call are known. Methods append to this list when they attach.
    call_transforms: list[Callable[["RoutingContext", dict], None]] = field(default_factory=list)

    def types_for(self, shape: tuple[int, int]) -> torch.Tensor | None:
        """The running call's token types if they cover `shape` (batch, length); None when the call is all text or
        is another one (a cached decoding step)."""
        types = self.token_types
        return types if types is not None and tuple(types.shape) == tuple(shape) else None


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
            context.token_types = announced if announced is not None and announced.shape == _call_shape(args, kwargs) else None
            for transform in context.call_transforms:
                transform(context, kwargs)
            return args, kwargs

        language_model.register_forward_pre_hook(activate, with_kwargs=True)
        state.context = context
    return state.context


@contextlib.contextmanager
def token_types(model: nn.Module, types: torch.Tensor, **extras: Any):
    """Run `model` (a bare language model with methods applied) with the given per-position token types."""
    context = state_of(model).context
    if context is None:
        raise RuntimeError("token_types() needs a model that has methods applied with pv.apply")
    previous = context.announced, context.extras
    context.announced, context.extras = types, dict(extras)
    try:
        yield context
    finally:
        context.announced, context.extras = previous
