"""LoRA in the vision tower, on request: `pv.apply(model, peft.LoraConfig(...), target="vision")`.

The same peft LoRA as `peft_vlm.methods.lora`, injected into `model.vision_tower` instead of the language model:
the tower of a model built here (open_clip, timm or transformers) or of a wrapped transformers VLM (its
`vision_tower`, Qwen2-VL's `visual`). `target_modules` name the tower's own modules (transformers CLIP/SigLIP:
`q_proj`, `v_proj`, `fc1`; timm: `qkv`, `proj`, `fc1`; open_clip: `c_fc`, `c_proj`, or `attn`, which peft wraps as a
whole `nn.MultiheadAttention`, whose `out_proj` it calls no forward of). Its weights are group `vision`; it starts
at B = 0 (identity), merges and unmerges like LoRA, and composes with LoRA in the language model. In a recipe or
preset: `{method: vision_lora, r: 8, target_modules: [q_proj, v_proj]}`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import peft
from torch import nn

from peft_vlm.methods.lora import LoraMethod
from peft_vlm.methods.registry import register


@dataclass
class VisionLoraConfig(peft.LoraConfig):
    """peft's `LoraConfig`, for the vision tower (the type tells the two methods apart in configs and files)."""


@register
class VisionLoraMethod(LoraMethod):
    name = "vision_lora"
    config_class = VisionLoraConfig
    needs_vision = True
    group = "vision"
    target = "vision"

    def root(self, model: nn.Module) -> nn.Module:
        return model.vision_tower

    @classmethod
    def config_for_target(cls, config):
        """A peft.LoraConfig given with `target="vision"`, as this method's config."""
        if not isinstance(config, peft.LoraConfig) or isinstance(config, VisionLoraConfig):
            return config if isinstance(config, VisionLoraConfig) else None
        return VisionLoraConfig(**{f.name: getattr(config, f.name) for f in fields(config) if f.init})
