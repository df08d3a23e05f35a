"""LLaMA-Adapter V2, the official code release's visual fusion (`llama_adapter_v2_multimodal7b`).

`VisualQueryPromptConfig`: learnable query tokens read
the image's patch tokens through a small transformer, are projected to the LM's width, and the resulting visual
query is added to the adaption prompts of the late layers (all but the first in the release). It changes the
adaption prompts, so it is applied after an `AdaptionPromptConfig` with the same `length`.

The paper's own form, early fusion, is `early_fusion.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peft_vlm.errors import IncompatibleMethodsError
from peft_vlm.methods.adaption_prompt import AdaptionPromptMethod, VisualPromptOffset
from peft_vlm.methods.registry import Method, register
from peft_vlm.runtime.lm_layers import hidden_dtype, hidden_size, layer_device
from peft_vlm.runtime.tracking import state_of


@dataclass
class VisualQueryPromptConfig:
    """The official V2 code's visual query: `depth` transformer blocks of width `width` over the projected patch
    tokens and the adaption prompts' `length` learnable queries (defaults as released: 8 blocks, 768 wide, 16 heads).
    """

    width: int = 768
    depth: int = 8
    heads: int = 16


class VisualQuery(VisualPromptOffset):
    """Patch tokens -> (images, length, hidden): the query tokens' outputs after the blocks, projected and normed."""

    def __init__(
        self, context, config: VisualQueryPromptConfig, vision_width: int, length: int, hidden: int, device, dtype
    ):
        super().__init__(context)
        width = config.width
        with torch.device(device):
            self.patch_projection = nn.Sequential(nn.Linear(vision_width, width), nn.LayerNorm(width))
            self.queries = nn.Parameter(torch.randn(length, width) * 0.02)
            block = dict(d_model=width, nhead=config.heads, dim_feedforward=4 * width, dropout=0.0,
                         activation="gelu", batch_first=True, norm_first=True)
            self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(**block) for _ in range(config.depth))
            self.output_projection = nn.Sequential(nn.Linear(width, hidden), nn.LayerNorm(hidden))
        self.to(dtype)

    def per_image(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        queries = self.queries.expand(patch_tokens.shape[0], -1, -1)
        x = torch.cat([self.patch_projection(patch_tokens), queries], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.output_projection(x[:, -len(self.queries):])


@register
class VisualQueryPromptMethod(Method):
    name = "visual_query_prompt"
    config_class = VisualQueryPromptConfig
    needs_vision = True

    def packing_refusal(self) -> str | None:
        return ("its visual query is added to the adaption prompts of a whole batch row, and a packed row holds "
                "several samples")

    def attach(self, model: nn.Module, language_model: nn.Module) -> dict[str, list[nn.Parameter]]:
        prompts = [e.method for e in state_of(model).methods() if isinstance(e.method, AdaptionPromptMethod)]
        if not prompts:
            raise IncompatibleMethodsError(
                "method 'visual_query_prompt' adds to the adaption prompts: apply an AdaptionPromptConfig before it"
            )
        query = VisualQuery(
            state_of(model).context, self.config, model.vision_tower.width, prompts[0].config.length,
            hidden_size(language_model), layer_device(model.connector), hidden_dtype(language_model),
        )
        query.train(model.training)  # eval blocks take PyTorch's fused path: follow the model's mode from the start
        model.add_module("visual_query", query)
        prompts[0].add_prompt_offset(query)
        return {"vision": list(query.parameters())}
