"""Vision towers: anything that turns a batch of images into patch tokens (batch, tokens, width).

`OpenClipVisionTower` wraps the vision half of an `open_clip` model and takes the patch tokens of one of its
transformer blocks (the second to last by default, as LLaVA does). Any other `nn.Module` that maps pixels to
(batch, tokens, width) can be used through `ModuleVisionTower`.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from peft_vlm.errors import ModelLoadError


class VisionTower(nn.Module):
    """What the vision-language model needs of a vision tower."""

    width: int  # channels of each patch token
    num_tokens: int  # patch tokens per image
    image_size: tuple[int, int]
    preprocess: Callable | None  # PIL image -> (3, H, W) tensor, or None if callers pass tensors
    description: dict  # identifies the tower in adapter fingerprints

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class OpenClipVisionTower(VisionTower):
    def __init__(
        self, name: str, pretrained: str | None = None, feature_layer: int = -2, resize_mode: str | None = None, seed: int = 0
    ):
        super().__init__()
        import open_clip  # imported here: it pulls in torchvision and timm

        try:
            # Without pretrained weights the tower is random; a fixed seed makes "random" reproducible, so a rebuilt
            # base matches the one an adapter was trained on.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                clip, _, preprocess = open_clip.create_model_and_transforms(
                    name, pretrained=pretrained, image_resize_mode=resize_mode
                )
        except RuntimeError as error:
            raise ModelLoadError(f"open_clip could not create vision tower '{name}' (pretrained={pretrained!r}): {error}") from None
        self.visual = clip.visual
        if not hasattr(self.visual, "forward_intermediates") or not hasattr(self.visual, "transformer"):
            raise ModelLoadError(f"vision tower '{name}' is not a ViT; patch tokens are taken from ViT towers only")
        del clip  # the text tower is not needed
        blocks = len(self.visual.transformer.resblocks)
        if not -blocks <= feature_layer < blocks:
            raise ModelLoadError(f"feature_layer={feature_layer} is out of range for '{name}' ({blocks} blocks)")
        self.feature_layer = feature_layer % blocks
        self.width = self.visual.transformer.width
        self.image_size = tuple(self.visual.image_size)
        self.num_tokens = self.visual.grid_size[0] * self.visual.grid_size[1]
        self.preprocess = preprocess
        self.description = {"open_clip": name, "pretrained": pretrained, "feature_layer": self.feature_layer}
        if pretrained is None:
            self.description["seed"] = seed

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.visual.forward_intermediates(
            pixel_values, indices=[self.feature_layer], stop_early=True, intermediates_only=True, output_fmt="NLC"
        )
        return out["image_intermediates"][0]


class ModuleVisionTower(VisionTower):
    """Any module mapping (batch, 3, H, W) pixels to (batch, tokens, width) patch tokens."""

    def __init__(self, module: nn.Module, image_size: int | tuple[int, int] = 224, preprocess: Callable | None = None):
        super().__init__()
        self.module = module
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.preprocess = preprocess
        parameter = next(module.parameters(), None)
        device = parameter.device if parameter is not None else "cpu"
        with torch.no_grad():
            probe = module(torch.zeros(1, 3, *self.image_size, device=device))
        if probe.dim() != 3:
            raise ModelLoadError(
                f"vision module {type(module).__name__} must return (batch, tokens, width) patch tokens, got shape {tuple(probe.shape)}"
            )
        self.num_tokens, self.width = probe.shape[1], probe.shape[2]
        self.description = {"module": type(module).__name__, "tokens": self.num_tokens, "width": self.width}

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.module(pixel_values)


def build_vision_tower(vision: str | nn.Module, pretrained: str | None = None, **options) -> VisionTower:
    if isinstance(vision, VisionTower):
        return vision
    if isinstance(vision, str):
        return OpenClipVisionTower(vision, pretrained=pretrained, **options)
    if isinstance(vision, nn.Module):
        return ModuleVisionTower(vision, **options)
    raise ModelLoadError(f"vision= must be an open_clip model name or an nn.Module, got {type(vision).__name__}")
