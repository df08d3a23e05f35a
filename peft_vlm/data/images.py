"""Images: open a file, bring it to the tower's input size, normalise it.

Three ways to reach a square input from an image of any shape:
- "resize": squash to the input size, ignoring aspect ratio. Prismatic (Karamcheti et al., 2024) found this best
  for CLIP towers, so it is the default.
- "letterbox": pad to a square with the normalisation mean colour (padding becomes zeros after normalising, as in
  LLaVA-1.5's `expand2square`), then resize; the whole image is kept, undistorted.
- "crop": resize the shorter side, then center-crop (CLIP's own evaluation transform); the borders are lost.

"resize" and "crop" are open_clip's own "squash" and "shortest" transforms; open_clip's "longest" pads with a fixed
grey level rather than the mean colour, so "letterbox" pads first and then squashes.

Any PIL mode becomes RGB as a viewer shows it: 16- and 32-bit integer images (16-bit PNGs open as "I;16" or "I")
are scaled from 0..65535 to 0..255, where PIL's own conversion clips them to white; float images ("F") holding
values in 0..1 are scaled by 255; transparent pixels are composited onto white (as transformers' `convert_to_rgb`
does), where dropping the alpha channel would show whatever colour they hide.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from peft_vlm.data.report import IMAGE_TOO_LARGE, MISSING_IMAGE, UNREADABLE_IMAGE
from peft_vlm.errors import ConfigError, DataError

RESIZE_MODES = ("resize", "letterbox", "crop")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_OPEN_CLIP_MODE = {"resize": "squash", "letterbox": "squash", "crop": "shortest"}


def load_image(image: Any, source: str) -> Image.Image:
    """An RGB PIL image from a path, a PIL image or an HWC uint8 array; a missing or corrupt file, or one larger than
    PIL's decompression-bomb limit, is a DataError naming the row and the file."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if not isinstance(image, (str, os.PathLike)):
        raise ConfigError(f"{source}: expected an image path, a PIL image, an HWC uint8 array or a (3, H, W) tensor, "
                          f"got {type(image).__name__}")
    path = Path(image)
    if not path.is_file():
        raise DataError(source, MISSING_IMAGE, str(path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL only warns up to twice its limit
            with Image.open(path) as opened:
                opened.load()  # decodes the whole file, so truncated files fail here
                return to_rgb(opened)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise DataError(source, IMAGE_TOO_LARGE, f"{path}: {error}") from None
    except (OSError, ValueError) as error:
        raise DataError(source, UNREADABLE_IMAGE, f"{path}: {error}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` in RGB, its levels and transparency as a viewer shows them (see the module's docstring)."""
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I"):
            values = values / 257  # 65535 -> 255
        elif values.size and values.min() >= 0 and values.max() <= 1:
            values = values * 255
        image = Image.fromarray(values.round().clip(0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


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
