"""Images: open a file, bring it to the tower's input size, normalise it.

Three ways to reach a square input from an image of any shape:
- "resize": squash to the input size, ignoring aspect ratio. Prismatic (Karamcheti et al., 2024) found this best
  for CLIP towers, so it is the default.
- "letterbox": pad to a square with the normalisation mean colour (padding becomes zeros after normalising, as in
  LLaVA-1.5's `expand2square`), then resize; the whole image is kept, undistorted.
- "crop": resize the shorter side, then center-crop (CLIP's own evaluation transform); the borders are lost.

"resize" and "crop" are open_clip's own "squash" and "shortest" transforms; open_clip's "longest" pads with a fixed
grey level rather than the mean colour, so "letterbox" pads first and then squashes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from peft_vlm.data.report import MISSING_IMAGE, UNREADABLE_IMAGE
from peft_vlm.errors import ConfigError, DataError

RESIZE_MODES = ("resize", "letterbox", "crop")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_OPEN_CLIP_MODE = {"resize": "squash", "letterbox": "squash", "crop": "shortest"}


def load_image(image: Any, source: str) -> Image.Image:
    """An RGB PIL image from a path, a PIL image or an HWC uint8 array; a missing or corrupt file is a DataError
    naming the row."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if not isinstance(image, (str, os.PathLike)):
        raise ConfigError(f"{source}: expected an image path, a PIL image, an HWC uint8 array or a (3, H, W) tensor, "
                          f"got {type(image).__name__}")
    path = Path(image)
    if not path.is_file():
        raise DataError(source, MISSING_IMAGE, str(path))
    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")  # convert() decodes the whole file, so truncated files fail here
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(source, UNREADABLE_IMAGE, f"{path}: {error}") from None


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), fill)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


class ImageProcessor:
    """PIL image or path -> normalised (3, H, W) tensor at the tower's input size."""

    def __init__(self, image_size: int | tuple[int, int], mode: str = "resize", mean=OPENAI_MEAN, std=OPENAI_STD,
                 interpolation: str = "bicubic"):
        if mode not in RESIZE_MODES:
            raise ConfigError(f"resize={mode!r} is not a resize mode; use one of {', '.join(RESIZE_MODES)}")
        from open_clip.transform import image_transform  # imported here: it pulls in torchvision

        self.mode = mode
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.fill = tuple(round(255 * m) for m in mean)
        self.transform = image_transform(self.image_size, is_train=False, mean=mean, std=std,
                                         resize_mode=_OPEN_CLIP_MODE[mode], interpolation=interpolation)

    @classmethod
    def for_tower(cls, tower, mode: str = "resize") -> "ImageProcessor":
        """Use the tower's input size and normalisation (open_clip's preprocess config where there is one); a tower
        that brings its own image processor (a transformers vision model) keeps it for the default mode, and in every
        mode when only that processor makes its input (SigLIP 2's patches)."""
        visual = getattr(tower, "visual", None)  # an open_clip tower's own preprocessing config
        config = getattr(tower, "preprocess_cfg", None) or getattr(visual, "preprocess_cfg", None) or {}
        own = getattr(tower, "image_processor", None) is not None
        if own and (mode == "resize" or getattr(tower, "patch_inputs", False)):  # a patch input only it can make
            fill = tuple(round(255 * m) for m in config.get("mean", (0, 0, 0)))
            return OwnImageProcessor(tower.preprocess, mode, fill)
        return cls(tower.image_size, mode, mean=config.get("mean", OPENAI_MEAN), std=config.get("std", OPENAI_STD),
                   interpolation=config.get("interpolation", "bicubic"))

    def __call__(self, image: Any, source: str = "image") -> torch.Tensor:
        image = load_image(image, source)
        if self.mode == "letterbox":
            image = pad_to_square(image, self.fill)
        return self.transform(image)


class OwnImageProcessor:
    """Images through a tower's own processor (e.g. a transformers `CLIPImageProcessor`), in training and at
    inference alike, so that a model exported to transformers sees the pixels it was trained on. In "letterbox" and
    "crop" mode the image is made square first (padded with the mean colour `fill`, or center-cropped)."""

    def __init__(self, preprocess, mode: str = "resize", fill: tuple[int, ...] = (0, 0, 0)):
        self.preprocess, self.mode, self.fill = preprocess, mode, fill

    def __call__(self, image: Any, source: str = "image") -> torch.Tensor:
        image = load_image(image, source)
        if self.mode == "letterbox":
            image = pad_to_square(image, self.fill)
        elif self.mode == "crop":
            side = min(image.size)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            image = image.crop((left, top, left + side, top + side))
        return self.preprocess(image)
