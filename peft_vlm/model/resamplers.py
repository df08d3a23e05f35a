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
    queries to the frozen patch tokens, feed-forward. With `reads_text`, text tokens share the self-attention with
    the queries (never the cross-attention) and have their own feed-forward, as in BLIP-2's Q-Former."""

    def __init__(self, width: int, vision_width: int, reads_text: bool = False):
        super().__init__()
        heads = _heads(width)
        self.self_attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.cross_attention = nn.MultiheadAttention(
            width, heads, kdim=vision_width, vdim=vision_width, batch_first=True
        )
        self.feed_forward = _post_norm_feed_forward(width)
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(3))
        if reads_text:
            self.text_feed_forward, self.text_norm = _post_norm_feed_forward(width), nn.LayerNorm(width)

    def forward(self, queries: torch.Tensor, patches: torch.Tensor, text: torch.Tensor | None = None,
                text_padding: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        joint, padding = queries, None
        if text is not None:
            joint = torch.cat([queries, text], dim=1)
            padding = torch.cat([text_padding.new_zeros(queries.shape[:2]), text_padding], dim=1)
        joint = self.norms[0](joint + self.self_attention(joint, joint, joint, key_padding_mask=padding,
                                                          need_weights=False)[0])
        queries = joint[:, : queries.shape[1]]
        if text is not None:
            text = joint[:, queries.shape[1]:]
            text = self.text_norm(text + self.text_feed_forward(text))
        queries = self.norms[1](queries + self.cross_attention(queries, patches, patches, need_weights=False)[0])
        return self.norms[2](queries + self.feed_forward(queries)), text


def _post_norm_feed_forward(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))


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
        self.blocks = nn.ModuleList(QFormerBlock(width, vision_width, self.reads_question) for _ in range(depth))
        self.proj = nn.Linear(width, hidden_size)

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return len(self.queries)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self._read(patches)

    def _read(self, patches: torch.Tensor, text: torch.Tensor | None = None,
              text_padding: torch.Tensor | None = None) -> torch.Tensor:
        patches = self.input_norm(patches)
        queries = self.queries.expand(patches.shape[0], -1, -1)
        for block in self.blocks:
            queries, text = block(queries, patches, text, text_padding)
        return self.proj(queries)


@register_connector("qformer_question")
class QuestionQFormer(QFormer):
    """BLIP-2 sec 4.3 (VQA fine-tuning): the Q-Former is conditioned on the question. The prompt's tokens (the
    language model's frozen input embeddings, mapped to the Q-Former's width, with learned positions) join the
    queries' self-attention in every block, so the queries can pick from the image what the question asks about
    and hand the frozen language model an answer-ready prompt. Without a question (`encode_images`) it reads the
    image alone."""

    reads_question = True
    MAX_QUESTION_TOKENS = 256  # positions beyond share the last one

    def __init__(self, vision_width: int, hidden_size: int, **options):
        super().__init__(vision_width, hidden_size, **options)
        width = self.queries.shape[-1]
        self.question_in = nn.Sequential(nn.Linear(hidden_size, width), nn.LayerNorm(width))
        self.question_positions = nn.Embedding(self.MAX_QUESTION_TOKENS, width)

    def forward(self, patches: torch.Tensor, question: torch.Tensor | None = None,
                question_mask: torch.Tensor | None = None) -> torch.Tensor:
        if question is None:
            return self._read(patches)
        positions = (question_mask.long().cumsum(-1) - 1).clamp(0, self.MAX_QUESTION_TOKENS - 1)
        text = self.question_in(question.to(patches.dtype)) + self.question_positions(positions)
        return self._read(patches, text, ~question_mask)
