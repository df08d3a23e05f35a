"""Helpers every method needs about the language model it attaches to."""
from __future__ import annotations

import torch
from torch import nn


def language_model_of(model: nn.Module) -> nn.Module:
    """The causal LM inside a VisionLanguageModel, or the model itself for a bare transformers LM."""
    return getattr(model, "language_model", model)


def is_vision_language_model(model: nn.Module) -> bool:
    return getattr(model, "language_model", None) is not None


def hidden_size(language_model: nn.Module) -> int:
    return language_model.get_input_embeddings().embedding_dim


def hidden_dtype(language_model: nn.Module) -> torch.dtype:
    """The dtype of hidden states (that of the embeddings; 4-bit layers store their weights in another)."""
    return language_model.get_input_embeddings().weight.dtype


def layer_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def decoder_layers(language_model: nn.Module) -> list[nn.Module]:
    """The decoder layers (modules holding a layer's self-attention), lowest first."""
    layers = [
        m for m in language_model.modules()
        if isinstance(getattr(getattr(m, "self_attn", None), "layer_idx", None), int)
    ]
    return sorted(layers, key=lambda m: m.self_attn.layer_idx)
