"""CogVLM's visual expert (Wang et al., arXiv 2311.03079): image tokens get their own attention and MLP weights.

In every chosen decoder layer the query, key, value and output projections and the MLP's gate, up and down
projections are wrapped. Text tokens go through the frozen language-model weights untouched; image tokens go
through expert weights; attention itself still runs over the whole sequence with the causal mask unchanged.
The expert is either a trainable copy of the LM weights (CogVLM; doubles the LM's size) or, with `rank=r`, the frozen
LM weights plus a trainable low-rank difference B A with B = 0 (a few million parameters; works on a 4-bit base).
Either way the model's outputs are unchanged at start.

Routing is gathered: once per call the router sorts the flattened positions into text rows and image rows (a
stable argsort of the token types and one count, read on the host), and every wrapped projection runs each path on
its own rows only, so the full expert costs no more projection work than the frozen layer it replaces. The row
indices are ordinary index tensors whose lengths are known before the projections run: nothing is selected by a
boolean mask inside the layers. A call without image positions (text-only input, every cached decoding step) runs
the frozen path alone: it costs nothing extra and gives exactly the base LM's logits, so the LM keeps its language
ability however the expert trains.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peft_vlm.errors import ConfigError, IncompatibleMethodsError
from peft_vlm.methods.registry import Method, register
from peft_vlm.runtime.token_context import IMAGE, RoutingContext
from peft_vlm.runtime.tracking import state_of

# Which projections of a LLaMA-class decoder layer get an expert, by the submodule that holds them.
EXPERT_PROJECTIONS = {
    "self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}


@dataclass
class VisualExpertConfig:
    """`rank=None`: full expert copies (CogVLM). `rank=r`: low-rank expert, scaled by `alpha / r` (default 1).
    `layers`: decoder layer indices (default: every layer). `shared_image_position`: all image tokens of one image
    share one rotary position (CogVLM's option). `group`: the parameter group of the expert weights."""

    rank: int | None = None
    alpha: float | None = None
    layers: list[int] | None = None
    shared_image_position: bool = False
    group: str = "vision"

    def __post_init__(self) -> None:
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise ConfigError(
                f"VisualExpertConfig: rank must be a positive integer or None (full expert), got {self.rank!r}"
            )
        if self.alpha is not None and self.rank is None:
            raise ConfigError("VisualExpertConfig: alpha scales the low-rank expert; it needs rank=r")
        if self.layers is not None:
            self.layers = list(self.layers)


@dataclass(frozen=True)
class Rows:
    """Where the text and image positions of one call are, as rows of its flattened (batch * length) positions."""

    text: torch.Tensor  # (text positions,) row indices
    image: torch.Tensor  # (image positions,) row indices
    restore: torch.Tensor  # (batch * length,) where each row sits in cat([text rows, image rows])


class ImageRouter:
    """The text and image rows of the current language-model call, shared by all wrapped projections of one model.

    They are worked out once per call (one host sync for the image count, not one per projection)."""

    def __init__(self, context: RoutingContext):
        self.context = context
        self._types: torch.Tensor | None = None
        self._rows: Rows | None = None

    def rows(self, hidden: torch.Tensor) -> Rows | None:
        """The rows of `hidden` (batch, length, features), or None when the call has no image position."""
        types = self.context.types_for(hidden.shape[:2])
        if types is None:
            return None
        if types is not self._types:
            self._types, self._rows = types, _split_rows(types.reshape(-1).to(hidden.device))
        return self._rows


def _split_rows(flat_types: torch.Tensor) -> Rows | None:
    is_image = (flat_types == IMAGE).to(torch.uint8)
    images = int(is_image.sum())
    if images == 0:
        return None
    order = torch.argsort(is_image, stable=True)
    texts = flat_types.numel() - images
    return Rows(text=order[:texts], image=order[texts:], restore=torch.argsort(order))


class FullExpert(nn.Module):
    """CogVLM's expert projection: a trainable copy of the language model's weights, applied to the image rows;
    the frozen projection handles the text rows."""

    def __init__(self, base: nn.Linear, where: str):
        super().__init__()
        if not base.weight.dtype.is_floating_point:
            raise ConfigError(
                f"the full visual expert copies the language model's weights, but {where} holds quantized "
                f"({type(base).__name__}) weights; use VisualExpertConfig(rank=r) for a low-rank expert on the frozen "
                "quantized weights, or load the base in full precision"
            )
        self.weight = nn.Parameter(base.weight.detach().clone())
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone())

    def forward(self, flat: torch.Tensor, base: nn.Module, rows: Rows) -> torch.Tensor:
        text = base(flat.index_select(0, rows.text))
        image = F.linear(flat.index_select(0, rows.image), self.weight, self.bias)
        return torch.cat([text, image]).index_select(0, rows.restore)


class LowRankExpert(nn.Module):
    """The frozen projection plus a trainable difference (alpha / r) B A, with B = 0 at start (LoRA's form), added
    on the image rows only."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None):
        super().__init__()
        weight = base.weight
        dtype = (
            weight.dtype if weight.dtype.is_floating_point else getattr(base, "compute_dtype", None) or torch.float32
        )
        self.A = nn.Parameter(torch.empty(rank, base.in_features, device=weight.device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, device=weight.device, dtype=dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = (alpha if alpha is not None else rank) / rank

    def forward(self, flat: torch.Tensor, base: nn.Module, rows: Rows) -> torch.Tensor:
        frozen = base(flat)
        image = flat.index_select(0, rows.image).to(self.A.dtype)
        difference = F.linear(F.linear(image, self.A), self.B) * self.scale
        return frozen.index_add(0, rows.image, difference.to(frozen.dtype))


class ExpertLinear(nn.Module):
    """A frozen projection (`base`, the text path) and its expert (the image path), each on its own positions."""

    def __init__(self, base: nn.Linear, expert: nn.Module, router: ImageRouter):
        super().__init__()
        self.base, self.expert = base, expert
        self.__dict__["router"] = router  # shared by every wrapped projection; not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.router.rows(x)
        if rows is None:
            return self.base(x)
        out = self.expert(x.reshape(-1, x.shape[-1]), self.base, rows)
        return out.view(*x.shape[:-1], out.shape[-1])


class SharedImagePositions:
    """CogVLM's position ids: the image tokens of one image share the rotary position of its first token, and the
    text after an image continues at the next position.

    A call with token types (training, uncached forward, the prompt of `generate`) gets its position ids moved back
    by the positions the images saved so far. Cached decoding steps carry no token types; their positions (which
    `generate` counts over every token) are moved back by what the whole prompt saved, so cached greedy decoding
    equals uncached decoding. A decoding step whose prompt ran without token types is refused rather than guessed.
    """

    def __init__(self) -> None:
        self._prompt: torch.Tensor | None = None  # the announced token types of the prompt last seen
        self._prompt_saved: torch.Tensor | None = None  # (batch, 1) positions that prompt saved

    def __call__(self, context: RoutingContext, kwargs: dict) -> None:
        if context.token_types is not None:
            saved = saved_positions(context.token_types, context.visual.tokens_per_image)
            kwargs["position_ids"] = _positions(kwargs, saved.shape) - saved
            if kwargs.get("attention_mask") is None:
                # Without a mask, transformers reads repeated position ids as packed sequences and splits attention.
                kwargs["attention_mask"] = torch.ones(saved.shape, dtype=torch.long, device=saved.device)
            self._prompt, self._prompt_saved = context.announced, saved[:, -1:]
        elif context.announced is not None and _cache_length(kwargs) > 0:
            if self._prompt is not context.announced:
                raise ConfigError(
                    "shared_image_position: a cached decoding step whose prompt ran without token types (the batch "
                    "changed between announcing token types and the call, e.g. beam search or num_return_sequences); "
                    "generate with one sequence per prompt"
                )
            kwargs["position_ids"] = _positions(kwargs, _call_input(kwargs).shape[:2]) - self._prompt_saved


def saved_positions(token_types: torch.Tensor, tokens_per_image: int | None) -> torch.Tensor:
    """(batch, length): how many positions the image tokens up to each position save by sharing one per image.

    Every image token but the first of its image saves one. Adjacent images are told apart by `tokens_per_image`
    (known to the vision-language model); without it a run of image tokens counts as one image."""
    image = token_types == IMAGE
    after_image = torch.cat([torch.zeros_like(image[:, :1]), image[:, :-1]], dim=1)
    repeats = image & after_image
    if tokens_per_image:
        repeats &= (image.long().cumsum(-1) - 1) % tokens_per_image != 0
    return repeats.long().cumsum(-1)


def _cache_length(kwargs: dict) -> int:
    cache = kwargs.get("past_key_values")
    return 0 if cache is None else int(cache.get_seq_length())


def _positions(kwargs: dict, shape: torch.Size) -> torch.Tensor:
    """The call's position ids, or the ones the language model would use without them (count on from the cache)."""
    positions = kwargs.get("position_ids")
    if positions is not None:
        return positions
    return (torch.arange(shape[1], device=_call_input(kwargs).device) + _cache_length(kwargs)).expand(shape)


def _call_input(kwargs: dict) -> torch.Tensor:
    for key in ("inputs_embeds", "input_ids"):
        if kwargs.get(key) is not None:
            return kwargs[key]
    raise ConfigError("shared_image_position needs the language model called with input_ids= or inputs_embeds=")


def _decoder_layers(language_model: nn.Module) -> nn.ModuleList:
    # a causal LM holds its layers in .model; the decoder of a wrapped transformers VLM holds them itself
    layers = getattr(getattr(language_model, "model", language_model), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(
            f"the visual expert needs a LLaMA-class causal LM (model.layers); got {type(language_model).__name__}"
        )
    return layers


@register
class VisualExpertMethod(Method):
    name = "visual_expert"
    config_class = VisualExpertConfig

    def packing_refusal(self) -> str | None:
        if self.config.shared_image_position:
            return ("shared_image_position=True counts the positions images save along a whole batch row, and a "
                    "packed row holds several samples; use shared_image_position=False")
        return None  # routing by token type acts per position

    def attach(self, model: nn.Module, language_model: nn.Module) -> dict[str, list[nn.Parameter]]:
        if any(not getattr(entry.method, "images_in_sequence", True) for entry in state_of(model).methods()):
            raise IncompatibleMethodsError("the visual expert routes image tokens, but a method took the images out of "
                                           "the sequence (early fusion with visual_tokens_in_sequence=False)")
        config, context = self.config, state_of(model).context
        layers = _decoder_layers(language_model)
        chosen = range(len(layers)) if config.layers is None else config.layers
        unknown = [i for i in chosen if not isinstance(i, int) or not -len(layers) <= i < len(layers)]
        if unknown:
            raise ConfigError(f"VisualExpertConfig: layers {unknown} do not exist; the model has {len(layers)} layers")
        router = ImageRouter(context)
        # Build every expert before swapping any module, so an error leaves the model as it was.
        swaps = []
        for index in sorted({i % len(layers) for i in chosen}):
            for part, names in EXPERT_PROJECTIONS.items():
                owner = self._part(layers[index], part, index)
                swaps += [
                    (owner, name, self._expert(getattr(owner, name), f"layer {index} {part}.{name}")) for name in names
                ]
        for owner, name, expert in swaps:
            setattr(owner, name, ExpertLinear(getattr(owner, name), expert, router))
        if config.shared_image_position:
            context.call_transforms.append(SharedImagePositions())
        return {config.group: [p for _, _, expert in swaps for p in expert.parameters()]}

    @staticmethod
    def _part(layer: nn.Module, part: str, index: int) -> nn.Module:
        module = getattr(layer, part, None)
        missing = [n for n in EXPERT_PROJECTIONS[part] if not isinstance(getattr(module, n, None), nn.Linear)]
        if missing:
            raise ConfigError(
                f"the visual expert wraps plain linear projections; layer {index} {part} has no linear "
                f"{', '.join(missing)} (apply the visual expert before methods that wrap these projections)"
            )
        return module

    def _expert(self, base: nn.Linear, where: str) -> nn.Module:
        if self.config.rank is None:
            return FullExpert(base, where)
        return LowRankExpert(base, self.config.rank, self.config.alpha)
