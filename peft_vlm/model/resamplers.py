"""Connectors with learned queries: Flamingo's perceiver resampler and BLIP-2's Q-Former.

Both turn any number of patch tokens into a fixed number of visual tokens per image, so the cost an image adds to
the prompt no longer depends on the tower's resolution. Each image is resampled on its own; video frames passed as
separate images are resampled independently (Flamingo's per-frame time embeddings are left out).
Registered with `peft_vlm.model.connectors` when the registry is first read.
"""
from __future__ import annotations

import torch
from torch import nn

from peft_vlm.model.connectors import Connector, register_connector


def _heads(width: int, preferred: int = 8) -> int:
    """The largest head count up to `preferred` that divides `width` (towers come in many widths)."""
    return next(h for h in range(min(preferred, width), 0, -1) if width % h == 0)


def _feed_forward(width: int, mult: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, mult * width), nn.GELU(), nn.Linear(mult * width, width))


class ResamplerBlock(nn.Module):
    """One perceiver block: the latents attend to [patches; latents], then a feed-forward layer."""

    def __init__(self, width: int):
        super().__init__()
        self.norm_media, self.norm_latents = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, _heads(width), batch_first=True)
        self.feed_forward = _feed_forward(width)

    def forward(self, patches: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        media, queries = self.norm_media(patches), self.norm_latents(latents)
        keys = torch.cat([media, queries], dim=1)
        # Flamingo app. A.1.1: x = x + attn(q=x, kv=[x_f; x]); x = x + ffw(x)
        latents = latents + self.attention(queries, keys, keys, need_weights=False)[0]
        return latents + self.feed_forward(latents)


@register_connector("perceiver_resampler")
class PerceiverResampler(Connector):
    """Flamingo (arXiv 2204.14198) sec 2.1: `num_latents` learned latents read each image's patch tokens through
    `depth` perceiver blocks at the tower's width; a linear layer maps them to the LM's width."""

    def __init__(self, vision_width: int, hidden_size: int, num_latents: int = 64, depth: int = 2):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, vision_width) * 0.02)
        self.blocks = nn.ModuleList(ResamplerBlock(vision_width) for _ in range(depth))
        self.norm = nn.LayerNorm(vision_width)
        self.proj = nn.Linear(vision_width, hidden_size)

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return len(self.latents)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        latents = self.latents.expand(patches.shape[0], -1, -1)
        for block in self.blocks:
            latents = block(patches, latents)
        return self.proj(self.norm(latents))


class QFormerBlock(nn.Module):
    """One BERT-like Q-Former block (post-norm, as BERT): self-attention among the queries, cross-attention from the
    queries to the frozen patch tokens, feed-forward."""

    def __init__(self, width: int, vision_width: int):
        super().__init__()
        heads = _heads(width)
        self.self_attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.cross_attention = nn.MultiheadAttention(
            width, heads, kdim=vision_width, vdim=vision_width, batch_first=True
        )
        self.feed_forward = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(3))

    def forward(self, queries: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        queries = self.norms[0](queries + self.self_attention(queries, queries, queries, need_weights=False)[0])
        queries = self.norms[1](queries + self.cross_attention(queries, patches, patches, need_weights=False)[0])
        return self.norms[2](queries + self.feed_forward(queries))


@register_connector("qformer")
class QFormer(Connector):
    """BLIP-2 (arXiv 2301.12597) sec 3.1: `num_queries` learned queries (32 in the paper) interact through
    self-attention and read the frozen tower's patch tokens through cross-attention in `depth` blocks; a linear
    layer projects their outputs to the LM's width (sec 3.3), where they act as soft visual prompts."""

    def __init__(
        self, vision_width: int, hidden_size: int, num_queries: int = 32, depth: int = 2, width: int | None = None
    ):
        super().__init__()
        width = width or vision_width
        self.queries = nn.Parameter(torch.randn(num_queries, width) * 0.02)
        self.input_norm = nn.LayerNorm(vision_width)
        self.blocks = nn.ModuleList(QFormerBlock(width, vision_width) for _ in range(depth))
        self.proj = nn.Linear(width, hidden_size)

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return len(self.queries)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        patches = self.input_norm(patches)
        queries = self.queries.expand(patches.shape[0], -1, -1)
        for block in self.blocks:
            queries = block(queries, patches)
        return self.proj(queries)
