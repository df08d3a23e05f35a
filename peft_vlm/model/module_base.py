"""What the vision-language models here share (built from parts, or a wrapped transformers VLM)."""
from __future__ import annotations

import torch
from torch import nn


class VisionLanguageModule(nn.Module):
    """A `vision_tower` that stays in eval mode unless it trains, and a `language_model` whose embeddings' device is
    where inputs go."""

    def _lm_device(self) -> torch.device:
        return self.language_model.get_input_embeddings().weight.device

    def train(self, mode: bool = True):
        super().train(mode)
        self.vision_tower.train(mode and any(p.requires_grad for p in self.vision_tower.parameters()))
        return self
