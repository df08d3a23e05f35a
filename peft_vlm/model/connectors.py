"""Connectors: project the vision tower's patch tokens into the language model's embedding space.

Registered by name; `connector="mlp2x_gelu"` is LLaVA-1.5's projector, `"linear"` LLaVA-1's, `"downsample2x2_mlp"`
CogVLM2's (a quarter of the visual tokens). Connectors with learned queries (`"perceiver_resampler"`, Flamingo;
`"qformer"`, BLIP-2, and `"qformer_question"`, its question-conditioned form) live in `peft_vlm.model.resamplers`,
loaded by import path when the registry is first read, as built-in methods are, so neither module imports the other
at load time.
"""
from __future__ import annotations

import importlib
import math
from typing import Callable

import torch
from torch import nn

from peft_vlm.errors import ConfigError

_connectors: dict[str, Callable[[int, int], nn.Module]] = {}
BUILTIN_CONNECTOR_MODULES = ("peft_vlm.model.resamplers",)


def register_connector(name: str):
    def decorator(factory):
        _connectors[name] = factory
        return factory

    return decorator


class Connector(nn.Module):
    """Maps (images, tokens_in, vision_width) to (images, tokens_out, lm_hidden)."""

    #: True for a connector that also reads the text of each image's prompt (BLIP-2's question-conditioned
    #: Q-Former): `forward(patches, question, question_mask)` then gets the language model's input embeddings of
    #: the prompt in each image's row, (images, length, lm_hidden), and a mask that is True on the prompt's tokens
    #: (never on image slots, padding or the answer being trained on).
    reads_question = False

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return num_input_tokens

    def bind_language_model(self, language_model: nn.Module) -> None:
        """Called once with the (frozen) language model the connector feeds; most connectors need nothing of it."""


@register_connector("linear")
class LinearConnector(Connector):
    def __init__(self, vision_width: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(vision_width, hidden_size)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.proj(patches)


@register_connector("mlp2x_gelu")
class MlpConnector(Connector):
    def __init__(self, vision_width: int, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(vision_width, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.mlp(patches)


@register_connector("downsample2x2_mlp")
class Downsample2x2MlpConnector(Connector):
    """CogVLM2's connector (arXiv 2408.16500): each 2x2 block of neighbouring patch tokens becomes one token before
    a two-layer GELU MLP, so an image costs a quarter of the visual tokens. Concatenating the block and projecting
    it is CogVLM2's stride-2, 2x2 convolution written as the first linear layer."""

    def __init__(self, vision_width: int, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(4 * vision_width, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size)
        )

    @staticmethod
    def grid_side(num_patches: int) -> int:
        side = math.isqrt(num_patches)
        if side * side != num_patches or side % 2:
            raise ConfigError(
                f"connector 'downsample2x2_mlp' merges 2x2 blocks of a square patch grid with an even side; "
                f"the vision tower gives {num_patches} patch tokens"
            )
        return side

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return (self.grid_side(num_input_tokens) // 2) ** 2

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        images, num_patches, width = patches.shape
        half = self.grid_side(num_patches) // 2
        # (images, rows, cols, width) in row-major patch order -> one row per 2x2 block: its 4 tokens side by side
        blocks = patches.reshape(images, half, 2, half, 2, width).permute(0, 1, 3, 2, 4, 5)
        return self.mlp(blocks.reshape(images, half * half, 4 * width))


@register_connector("vocabulary")
class VocabularyConnector(Connector):
    """Visual tokens made of the language model's own words: each input token becomes `TOKENS_PER_INPUT` tokens,
    each a softmax mixture of the frozen input embeddings (a two-layer GELU MLP gives the mixture's logits against
    every word embedding). The language model then reads an image as it reads text, with the circuits it already
    has for comparing words: a soft form of mapping images to the frozen LM's vocabulary (LQAE, arXiv 2302.00902;
    SPAE, arXiv 2306.17842). With the caption given as text, the V2 adapters answer easy-VQA's yes/no questions
    after 100 steps, which they do not learn from an `mlp2x_gelu` token (benchmarks/VISION_LEVERS.md).

    The embeddings are the language model's (bound by `bind_language_model`, not a submodule): neither trained
    nor saved with the connector."""

    TOKENS_PER_INPUT = 2

    def __init__(self, vision_width: int, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.mlp = nn.Sequential(nn.Linear(vision_width, hidden_size), nn.GELU(),
                                 nn.Linear(hidden_size, self.TOKENS_PER_INPUT * hidden_size))
        self.norm = nn.LayerNorm(hidden_size)
        # softmax temperature (learned, as CLIP's): at 4 a mixture starts spread over a few hundred words, where
        # its gradients are large; unscaled dot products start uniform over the vocabulary and barely move
        self.logit_scale = nn.Parameter(torch.tensor(math.log(4.0)))
        self._vocabulary: tuple[nn.Embedding, ...] = ()
        self._word_scale = 1.0

    def bind_language_model(self, language_model: nn.Module) -> None:
        embedding = language_model.get_input_embeddings()
        self._vocabulary = (embedding,)
        # 1 / the rms of the frozen word embeddings, once: the logits are taken against standardised embeddings
        with torch.no_grad():
            self._word_scale = float(torch.rsqrt(embedding.weight.float().pow(2).mean() + 1e-12))

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return self.TOKENS_PER_INPUT * num_input_tokens

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        if not self._vocabulary:
            raise ConfigError("connector 'vocabulary' needs bind_language_model(language_model) before use")
        images, tokens, _ = patches.shape
        queries = self.mlp(patches).reshape(images, tokens * self.TOKENS_PER_INPUT, self.hidden_size)
        words = self._vocabulary[0].weight.to(queries.dtype)
        # cosine similarity of each (normalised) query with each standardised word embedding, times the scale
        similarity = (self.norm(queries) @ words.T).float() * (self._word_scale / math.sqrt(self.hidden_size))
        mixture = torch.softmax(similarity * self.logit_scale.exp(), dim=-1)
        return mixture.to(queries.dtype) @ words


def _load_builtin_modules() -> None:
    for module in BUILTIN_CONNECTOR_MODULES:
        importlib.import_module(module)  # registers its connectors; a no-op after the first time


def available_connectors() -> list[str]:
    _load_builtin_modules()
    return sorted(_connectors)


def check_connector(name: str, where: str = "") -> None:
    """A ConfigError naming `name` unless it is a registered connector (checked before any model is loaded)."""
    if name not in available_connectors():
        raise ConfigError(f"{where}unknown connector '{name}'; "
                          f"available connectors: {', '.join(available_connectors())}")


def build_connector(name: str, vision_width: int, hidden_size: int) -> Connector:
    check_connector(name)
    return _connectors[name](vision_width, hidden_size)
