"""Add to a layer's attention output without touching the model's code: attention extensions.

Methods such as adaption prompts or early visual fusion need the query of each layer after rotary embedding and a
place to add their own attention output. Instead of copying a model's attention module, this module registers, for
the model's attention implementation (e.g. "sdpa"), a thin one named "peft_vlm_sdpa" in `transformers`'
`AttentionInterface` (with the base's mask format in `AttentionMaskInterface`), switches the language model to it,
and there calls the base implementation followed by every extension registered on that attention module. A model
without extensions computes exactly what the base computes.

An extension is a callable `extension(call: AttentionCall) -> Tensor | None` returning an addition to the attention
output, shaped like `call.output` (batch, query length, heads, head dim), i.e. before the output projection.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface

PREFIX = "peft_vlm_"
EXTENSIONS_ATTRIBUTE = "_peft_vlm_attention_extensions"


def kernel_under(name: str | None) -> str | None:
    """The attention kernel under the methods' extensible twin ("peft_vlm_eager" -> "eager"); None stays None."""
    return name.removeprefix(PREFIX) if name else name


@dataclass
class AttentionCall:
    """One call of a layer's attention, as an extension sees it."""

    module: nn.Module  # the attention module: layer_idx, k_proj, v_proj, head_dim, scaling, ...
    query: torch.Tensor  # (batch, heads, query length, head dim), after rotary embedding
    key: torch.Tensor  # (batch, kv heads, key length, head dim), cached keys included
    value: torch.Tensor
    attention_mask: torch.Tensor | None  # in the base implementation's format (None: causal without padding)
    output: torch.Tensor  # the base output, (batch, query length, heads, head dim)
    kwargs: dict[str, Any] = field(default_factory=dict)


Extension = Callable[[AttentionCall], "torch.Tensor | None"]


def _eager_of(module: nn.Module) -> Callable:
    """The model's own eager attention (each modeling file defines `eager_attention_forward`)."""
    return getattr(sys.modules[type(module).__module__], "eager_attention_forward")


def _base_function(base: str) -> Callable:
    if base == "eager":
        return lambda module, *args, **kwargs: _eager_of(module)(module, *args, **kwargs)
    return AttentionInterface()[base]


def _extended(base: str) -> Callable:
    base_function = _base_function(base)

    def attention(module, query, key, value, attention_mask, **kwargs):
        output, weights = base_function(module, query, key, value, attention_mask, **kwargs)
        extensions = module.__dict__.get(EXTENSIONS_ATTRIBUTE)
        if extensions:
            call = AttentionCall(module, query, key, value, attention_mask, output, kwargs)
            for extension in extensions:
                addition = extension(call)
                if addition is not None:
                    output = output + addition.to(output.dtype)
        return output, weights

    attention.__name__ = f"{PREFIX}{base}_attention"
    return attention


def install(language_model: nn.Module) -> str:
    """Switch the language model to the extensible twin of its attention implementation (idempotent); its name."""
    config = language_model.config
    current = config._attn_implementation or "eager"
    if current.startswith(PREFIX):
        return current
    masks = AttentionMaskInterface()
    if current not in masks or (current != "eager" and current not in AttentionInterface()):
        raise ValueError(f"attention implementation '{current}' cannot carry attention extensions")
    name = PREFIX + current
    if name not in AttentionInterface():
        AttentionInterface.register(name, _extended(current))
        AttentionMaskInterface.register(name, masks[current])
    config._attn_implementation = name
    return name


def attention_modules(language_model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every decoder layer, lowest layer first."""
    modules = [
        m for m in language_model.modules() if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "k_proj")
    ]
    return sorted(modules, key=lambda m: m.layer_idx)


def add_extension(language_model: nn.Module, module: nn.Module, extension: Extension) -> None:
    """Run `extension` after the base attention of `module` (one of `attention_modules(language_model)`)."""
    install(language_model)
    module.__dict__.setdefault(EXTENSIONS_ATTRIBUTE, []).append(extension)


def remove_extension(module: nn.Module, extension: Extension) -> None:
    extensions = module.__dict__.get(EXTENSIONS_ATTRIBUTE, [])
    if extension in extensions:
        extensions.remove(extension)


def project_tokens(module: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of extra tokens (batch or 1, count, hidden) through the layer's own frozen projections.

    No rotary embedding: the tokens have no position. Returns (batch, heads, count, head dim) each, key/value heads
    repeated for grouped-query attention.
    """
    batch, count = tokens.shape[:2]
    head_dim = module.head_dim
    keys = module.k_proj(tokens).view(batch, count, -1, head_dim).transpose(1, 2)
    values = module.v_proj(tokens).view(batch, count, -1, head_dim).transpose(1, 2)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
    return keys, values


def gated_token_attention(
    call: AttentionCall,
    tokens: torch.Tensor,
    gate: torch.Tensor,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Zero-init gated attention of every query to extra tokens, in its own softmax (LLaMA-Adapter eq. 8-9).

    `tokens` (batch or 1, count, hidden) go through the layer's frozen key/value projections; `gate` (heads,) is
    the raw gate g, applied as tanh(g) per head, so g = 0 adds exactly zero. `token_mask` (batch, count), True where
    a token may be attended, or (batch, query length, count) per query (packed rows: each sample its own tokens).
    Returns an addition shaped like `call.output`.
    """
    keys, values = project_tokens(call.module, tokens.to(call.query.dtype))
    # softmax(q K^T) (tanh(g) V) = tanh(g) softmax(q K^T) V, and gating the few values is the cheaper side.
    values = values * torch.tanh(gate).to(values.dtype).view(1, -1, 1, 1)
    batch = call.query.shape[0]
    keys, values = keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1)
    scale = getattr(call.module, "scaling", None) or call.query.shape[-1] ** -0.5
    # Plain matmuls and a float32 softmax rather than SDPA: against a handful of tokens the fused CPU kernels cost
    # more than the arithmetic (in bf16 their backward is far slower; benchmarks/bench_cpu_mfu.py), and the result
    # is the same.
    scores = (call.query @ keys.transpose(-1, -2)) * scale
    if token_mask is not None:
        per_query = token_mask[:, None] if token_mask.dim() == 3 else token_mask[:, None, None, :]
        scores = scores.masked_fill(~per_query, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
    return (weights @ values).transpose(1, 2)
