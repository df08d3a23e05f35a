"""Vision towers: anything that turns a batch of images into patch tokens (batch, tokens, width).

`OpenClipVisionTower` wraps the vision half of an `open_clip` model and takes the patch tokens of one of its
transformer blocks (the second to last by default, as LLaVA does). `TimmVisionTower` does the same for a `timm`
ViT (`"timm:vit_large_patch14_dinov2"`, DINOv2's architecture). Any other `nn.Module` that maps pixels to
(batch, tokens, width) can be used through `ModuleVisionTower`. `FusedVisionTower` puts two towers side by side
(Prismatic's DINOv2 + SigLIP): their patch features are concatenated along channels. `TransformersVisionTower`
takes a `transformers` vision model (CLIP, SigLIP / SigLIP 2, DINOv2 through `AutoModel`) by local path or hub id
(`"transformers:openai/clip-vit-large-patch14-336"`) with its own image processor.
"""
from __future__ import annotations

import math
import os
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from peft_vlm.errors import ConfigError, ModelLoadError
from peft_vlm.options import check_arguments
from peft_vlm.model import weights_files

TIMM_PREFIX = "timm:"
TRANSFORMERS_PREFIX = "transformers:"


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
        self, name: str, pretrained: str | None = None, feature_layer: int = -2, resize_mode: str | None = None,
        seed: int = 0, tokens: str = "patches",
    ):
        """`tokens`: "patches" (the patch tokens of block `feature_layer`) or "pooled" (one token: the image embedding
        that CLIP's contrastive loss aligns with the caption's, i.e. the pooled, projected output)."""
        super().__init__()
        if tokens not in ("patches", "pooled"):
            raise ModelLoadError(f"vision tower '{name}': tokens={tokens!r}; use 'patches' or 'pooled'")
        import open_clip  # imported here: it pulls in torchvision and timm

        weights_files.require_open_clip_safetensors(name, pretrained)

        try:
            # Without pretrained weights the tower is random; a fixed seed makes "random" reproducible, so a rebuilt
            # base matches the one an adapter was trained on.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                clip, _, preprocess = open_clip.create_model_and_transforms(
                    name, pretrained=pretrained, image_resize_mode=resize_mode
                )
        except RuntimeError as error:
            raise ModelLoadError(
                f"open_clip could not create vision tower '{name}' (pretrained={pretrained!r}): {error}"
            ) from None
        self.visual = clip.visual
        if not hasattr(self.visual, "forward_intermediates") or not hasattr(self.visual, "transformer"):
            raise ModelLoadError(f"vision tower '{name}' is not a ViT; patch tokens are taken from ViT towers only")
        del clip  # the text tower is not needed
        blocks = len(self.visual.transformer.resblocks)
        if not -blocks <= feature_layer < blocks:
            raise ModelLoadError(f"feature_layer={feature_layer} is out of range for '{name}' ({blocks} blocks)")
        self.feature_layer = feature_layer % blocks
        self.tokens = tokens
        self.image_size = tuple(self.visual.image_size)
        if tokens == "pooled":
            self.width, self.num_tokens, self.grid_size = self.visual.output_dim, 1, (1, 1)
        else:
            self.width = self.visual.transformer.width
            self.grid_size = tuple(self.visual.grid_size)
            self.num_tokens = self.grid_size[0] * self.grid_size[1]
        self.preprocess = preprocess
        self.preprocess_cfg = dict(getattr(self.visual, "preprocess_cfg", None) or {})
        self.pretrained = pretrained
        given, defaults = {"feature_layer": feature_layer, "tokens": tokens}, {"feature_layer": -2, "tokens": "patches"}
        self.rebuild_options = {key: value for key, value in given.items() if value != defaults[key]}  # for base_spec()
        # a weights file is named by its file name only: the path differs between machines, the digest of the
        # weights in adapter fingerprints tells files apart
        portable = os.path.basename(pretrained) if pretrained and os.path.isfile(pretrained) else pretrained
        self.description = {"open_clip": name, "pretrained": portable, "feature_layer": self.feature_layer}
        if tokens != "patches":
            self.description["tokens"] = tokens
        if pretrained is None:
            self.description["seed"] = seed

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.tokens == "pooled":
            return self.visual(pixel_values).unsqueeze(1)
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
                f"vision module {type(module).__name__} must return (batch, tokens, width) patch tokens, "
                f"got shape {tuple(probe.shape)}"
            )
        self.num_tokens, self.width = probe.shape[1], probe.shape[2]
        self.description = {"module": type(module).__name__, "tokens": self.num_tokens, "width": self.width}

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.module(pixel_values)


class TimmVisionTower(VisionTower):
    """A `timm` ViT, e.g. DINOv2's `vit_large_patch14_dinov2`: patch tokens (prefix tokens dropped) of one block,
    the second to last by default. `model_options` go to `timm.create_model` (img_size, patch_size, ...)."""

    def __init__(self, name: str, pretrained: bool = False, feature_layer: int = -2, seed: int = 0, **model_options):
        super().__init__()
        import timm

        if pretrained:  # from the hub's safetensors file only: timm's own search ends at a pickled one
            model_options["pretrained_cfg_overlay"] = {"file": weights_files.timm_safetensors_weights(name),
                                                         "source": "timm"}
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.model = timm.create_model(name, pretrained=bool(pretrained), num_classes=0, **model_options)
        except (RuntimeError, TypeError) as error:
            raise ModelLoadError(f"timm could not create vision tower '{name}': {error}") from None
        if not hasattr(self.model, "forward_intermediates") or not hasattr(self.model, "patch_embed"):
            raise ModelLoadError(f"timm model '{name}' is not a ViT; patch tokens are taken from ViT towers only")
        blocks = len(self.model.blocks)
        if not -blocks <= feature_layer < blocks:
            raise ModelLoadError(f"feature_layer={feature_layer} is out of range for '{name}' ({blocks} blocks)")
        self.feature_layer = feature_layer % blocks
        self.grid_size = tuple(self.model.patch_embed.grid_size)
        self.num_tokens, self.width = self.grid_size[0] * self.grid_size[1], self.model.num_features
        self.image_size = tuple(self.model.patch_embed.img_size)
        config = {**timm.data.resolve_model_data_config(self.model), "input_size": (3, *self.image_size)}
        self.preprocess = timm.data.create_transform(**config, is_training=False)
        self.preprocess_cfg = {key: config[key] for key in ("mean", "std", "interpolation")}
        self.description = {"timm": name, "pretrained": bool(pretrained), "feature_layer": self.feature_layer,
                            **{key: value for key, value in model_options.items()
                               if isinstance(value, (int, float, str))}}
        if not pretrained:
            self.description["seed"] = seed

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.forward_intermediates(
            pixel_values, indices=[self.feature_layer], intermediates_only=True, output_fmt="NLC"
        )[0]


class TransformersVisionTower(VisionTower):
    """A `transformers` vision model (CLIP, SigLIP / SigLIP 2, DINOv2, ...) from a local folder or hub id.

    The patch tokens are the hidden states after one layer (`hidden_states[feature_layer]`, the second to last layer
    by default, as LLaVA's `vision_feature_layer`), with the prefix tokens (CLIP's and DINOv2's class token, DINOv2's
    registers) dropped. A folder that holds a two-tower model (CLIPModel, SiglipModel) gives its vision half. Images
    go through the model's own image processor (`AutoImageProcessor`).

    SigLIP 2's NaFlex processor gives each image as flattened patches of an aspect-preserving grid (`pixel_values`
    (N, C*p*p), padded to `max_num_patches`, with `pixel_attention_mask` and `spatial_shapes`). A model built here
    gives every image the same number of visual tokens, so the image is first brought to a square (the model's resize
    mode) and the processor then gives every image one grid: `patch_inputs` is True, the tower's input is those
    patches and it passes the grid's mask and shape itself."""

    def __init__(self, path: str, feature_layer: int = -2, image_processor=None):
        super().__init__()
        from transformers import AutoConfig, AutoImageProcessor, AutoModel

        try:
            config = AutoConfig.from_pretrained(path)
            model = AutoModel.from_pretrained(path, use_safetensors=True)
            processor = image_processor or AutoImageProcessor.from_pretrained(path)
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"could not load a transformers vision model from '{path}': {error}") from None
        if hasattr(config, "vision_config") and hasattr(model, "vision_model"):  # keep the vision half only
            vision = AutoModel.from_config(config.vision_config)
            vision.vision_model.load_state_dict(model.vision_model.state_dict())
            model = vision
        self.model = model.eval()
        self.image_processor = processor
        layers = self.model.config.num_hidden_layers
        if not -(layers + 1) <= feature_layer <= layers:
            raise ModelLoadError(f"feature_layer={feature_layer} is out of range for '{path}' ({layers} layers)")
        self.feature_layer = feature_layer
        self.preprocess_cfg = {"mean": list(processor.image_mean), "std": list(processor.image_std)}
        from PIL import Image

        patch = self.model.config.patch_size
        square = Image.new("RGB", (32, 32))
        processed = processor(images=square, return_tensors="pt")
        self.patch_inputs = "spatial_shapes" in processed
        if self.patch_inputs:
            self.register_buffer("spatial_shapes", processed["spatial_shapes"][:1], persistent=False)
            self.register_buffer("patch_mask", processed["pixel_attention_mask"][:1], persistent=False)
            rows, cols = (int(size) for size in processed["spatial_shapes"][0])
            self.image_size = (rows * patch, cols * patch)
            resample = getattr(processor, "resample", None)
            self.preprocess = lambda image: processor(
                images=image.resize((cols * patch, rows * patch), resample), return_tensors="pt")["pixel_values"][0]
        else:
            self.preprocess = lambda image: processor(images=image, return_tensors="pt")["pixel_values"][0]
            self.image_size = tuple(self.preprocess(square).shape[-2:])
        self.grid_size = (self.image_size[0] // patch, self.image_size[1] // patch)
        self.num_tokens, self.width = self.grid_size[0] * self.grid_size[1], self.model.config.hidden_size
        with torch.no_grad():
            hidden = self._hidden_states(self.preprocess(square)[None])
        # class token, registers (SigLIP 2's padding patches come after the image's, and are dropped too)
        self.prefix_tokens = 0 if self.patch_inputs else hidden.shape[1] - self.num_tokens
        self.description = {"transformers": self.model.config.model_type, "feature_layer": feature_layer,
                            "image_size": list(self.image_size), "hidden_size": self.width}
        self.rebuild_options = {"feature_layer": feature_layer} if feature_layer != -2 else {}
        self.source = TRANSFORMERS_PREFIX + str(path)  # how a recipe names it (kept out of the base fingerprint)

    def _hidden_states(self, pixel_values: torch.Tensor) -> torch.Tensor:
        grid = {}
        if self.patch_inputs:  # every image has the one grid the tower was set up with
            grid = {"pixel_attention_mask": self.patch_mask.expand(len(pixel_values), -1),
                    "spatial_shapes": self.spatial_shapes.expand(len(pixel_values), -1)}
        return self.model(pixel_values, output_hidden_states=True, **grid).hidden_states[self.feature_layer]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self._hidden_states(pixel_values)
        return hidden[:, self.prefix_tokens: self.prefix_tokens + self.num_tokens]


def token_grid(tower: VisionTower) -> tuple[int, int] | None:
    """(rows, columns) of a tower's patch tokens: its own grid, else a square one, else None (unknown)."""
    grid = getattr(tower, "grid_size", None)
    if grid is not None:
        return tuple(grid)
    side = math.isqrt(tower.num_tokens)
    return (side, side) if side * side == tower.num_tokens else None


def _normalisation(tower: VisionTower) -> tuple[torch.Tensor, torch.Tensor]:
    config = getattr(tower, "preprocess_cfg", None) or {}
    from peft_vlm.data.images import OPENAI_MEAN, OPENAI_STD

    mean, std = config.get("mean", OPENAI_MEAN), config.get("std", OPENAI_STD)
    return torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)


class FusedVisionTower(VisionTower):
    """Prismatic (Karamcheti et al., arXiv 2402.07865) sec 4.3: two frozen towers side by side, e.g. a SigLIP/CLIP
    tower for semantics and a DINOv2 tower for spatial detail; each image token is [first; second] along channels.

    Images come in at the first tower's size and normalisation (its preprocessing, and what the data pipeline
    produces); the second tower gets them re-normalised with its own statistics and resized to its own input
    size. Its token grid is interpolated (bilinear) to the first tower's grid when the two differ; a tower whose
    grid is unknown (non-square) must match the other's token count exactly, otherwise the tower is refused.
    """

    def __init__(self, first: VisionTower, second: VisionTower, interpolate: bool = True):
        super().__init__()
        patch_towers = [t.description.get("transformers") for t in (first, second) if getattr(t, "patch_inputs", 0)]
        if patch_towers:
            raise ConfigError(f"a fused vision tower takes towers of (batch, 3, H, W) images; {patch_towers[0]} takes "
                              "flattened patches (SigLIP 2's NaFlex input), so it cannot be fused")
        self.towers = nn.ModuleList([first, second])
        grids = [token_grid(first), token_grid(second)]
        self.resample = None not in grids and grids[0] != grids[1]
        if (self.resample and not interpolate) or (None in grids and first.num_tokens != second.num_tokens):
            raise ConfigError(
                f"fused vision towers need matching token grids: the first gives {first.num_tokens} tokens "
                f"(grid {grids[0]}), the second {second.num_tokens} (grid {grids[1]})"
                + ("" if interpolate else "; pass interpolate=True to resample the second grid")
            )
        self.grid_size = grids[0]
        self.width = first.width + second.width
        self.num_tokens, self.image_size = first.num_tokens, tuple(first.image_size)
        self.preprocess, self.preprocess_cfg = first.preprocess, dict(getattr(first, "preprocess_cfg", None) or {})
        self.description = {"fused": [first.description, second.description]}
        (mean_in, std_in), (mean, std) = _normalisation(first), _normalisation(second)
        self.register_buffer("rescale", std_in / std, persistent=False)  # x' = (x std_1 + mean_1 - mean_2) / std_2
        self.register_buffer("shift", (mean_in - mean) / std, persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        first, second = self.towers
        pixels = pixel_values * self.rescale.to(pixel_values) + self.shift.to(pixel_values)
        if tuple(pixels.shape[-2:]) != tuple(second.image_size):
            pixels = F.interpolate(pixels, size=tuple(second.image_size), mode="bilinear", align_corners=False)
        features = [first(pixel_values), second(pixels)]
        if self.resample:
            (rows, cols), (rows2, cols2) = self.grid_size, token_grid(second)
            grid = features[1].transpose(1, 2).reshape(len(pixels), -1, rows2, cols2)
            grid = F.interpolate(grid, size=(rows, cols), mode="bilinear", align_corners=False)
            features[1] = grid.flatten(2).transpose(1, 2)
        return torch.cat([features[0], features[1].to(features[0].dtype)], dim=-1)


def _tower_arguments(vision, pretrained=None) -> tuple[type[VisionTower], tuple]:
    """The tower class for `vision` and the positional arguments it is built with (options come as keywords)."""
    if isinstance(vision, str) and vision.startswith(TRANSFORMERS_PREFIX):
        return TransformersVisionTower, (vision[len(TRANSFORMERS_PREFIX):],)
    if isinstance(vision, str) and vision.startswith(TIMM_PREFIX):
        return TimmVisionTower, (vision[len(TIMM_PREFIX):], bool(pretrained))
    if isinstance(vision, str):
        return OpenClipVisionTower, (vision, pretrained)
    if isinstance(vision, nn.Module):
        return ModuleVisionTower, (vision,)
    raise ModelLoadError(f"vision= must be an open_clip model name or an nn.Module, got {type(vision).__name__}")


def check_vision_options(vision, options: dict, where: str = "vision_options") -> None:
    """A ConfigError naming the first of `options` (model.vision_options) that the tower `vision` does not take."""
    if not isinstance(vision, (list, tuple, VisionTower)):
        tower_class, given = _tower_arguments(vision)
        check_arguments(tower_class.__init__, options, where, None, *given)


def _single_tower(vision, pretrained=None, **options) -> VisionTower:
    if isinstance(vision, VisionTower):
        return vision
    tower_class, given = _tower_arguments(vision, pretrained)
    check_arguments(tower_class.__init__, options, "vision_options", None, *given)
    return tower_class(*given, **options)


def build_vision_tower(vision, pretrained: str | None = None, **options) -> VisionTower:
    """A tower from an open_clip name, "timm:NAME", a module, or a list of two of those (each a name, a module, or
    a mapping {vision: NAME, pretrained: TAG, ...options}) for a `FusedVisionTower`."""
    if not isinstance(vision, (list, tuple)):
        return _single_tower(vision, pretrained, **options)
    if len(vision) != 2 or pretrained is not None or options:
        raise ConfigError("a fused vision tower takes a list of exactly two towers, each with its own options "
                          "as a mapping {vision: NAME, pretrained: TAG, ...}")
    towers = [_single_tower(**spec) if isinstance(spec, dict) else _single_tower(spec) for spec in vision]
    return FusedVisionTower(*towers)
