"""Train the visual expert for a few AdamW steps on fixed data, sharded with FSDP2 or in one process.

    python -m torch.distributed.run --nproc_per_node 2 tests/scripts/train_visual_expert.py OUT [--rank R]
    python tests/scripts/train_visual_expert.py OUT [--rank R]

Every step sees the same global batch of two shards. Under torchrun each process takes one shard, its decoder layers
and the whole model are sharded with `fully_shard`, and FSDP averages the gradients; alone, the process accumulates
the two shards' gradients. Both must therefore write the same adapter file.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from tokenizers import Tokenizer, models
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

import peft_vlm as pv
from peft_vlm.data.prompting import IGNORE_INDEX, IMAGE_TOKEN_ID
from peft_vlm.model.vision_towers import build_vision_tower

STEPS = 3
LM = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, max_position_embeddings=128)


class Patches(nn.Module):
    """A 16x16 image as a 4x4 grid of patch tokens."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 24, kernel_size=4, stride=4)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.conv(pixels).flatten(2).transpose(1, 2)


def build_model(rank: int | None) -> pv.VisionLanguageModel:
    """The same tiny model in every process: a seeded LM, a patch convolution as vision tower, the expert."""
    torch.manual_seed(0)
    config = LlamaConfig(**LM)
    config._attn_implementation = "sdpa"
    language_model = AutoModelForCausalLM.from_config(config)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "<pad>": 1, "</s>": 2}, unk_token="<unk>")),
        unk_token="<unk>", pad_token="<pad>", eos_token="</s>",
    )
    model = pv.VisionLanguageModel(language_model, tokenizer, build_vision_tower(Patches(), image_size=16))
    return pv.apply(model, pv.VisualExpertConfig(rank=rank))


def shards(tokens_per_image: int) -> list[dict[str, torch.Tensor]]:
    """Two fixed shards of two rows, each row a text with one image in it, except the last row: text only."""
    generator = torch.Generator().manual_seed(1)
    text = torch.randint(3, LM["vocab_size"], (4, 12 + tokens_per_image), generator=generator)
    input_ids = torch.cat([text[:3, :4], torch.full((3, tokens_per_image), IMAGE_TOKEN_ID), text[:3, 4:12]], dim=1)
    input_ids = torch.cat([input_ids, text[3:]])
    labels = torch.where(input_ids == IMAGE_TOKEN_ID, IGNORE_INDEX, input_ids)
    pixels = torch.randn(3, 3, 16, 16, generator=generator)
    return [
        {"input_ids": input_ids[:2], "labels": labels[:2], "pixel_values": pixels[:2]},
        {"input_ids": input_ids[2:], "labels": labels[2:], "pixel_values": pixels[2:]},
    ]


def train(model: nn.Module, my_shards: list[dict], scale: float) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for _ in range(STEPS):
        for shard in my_shards:
            (model(**shard).loss * scale).backward()
        optimizer.step()
        optimizer.zero_grad()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output")
    parser.add_argument("--rank", type=int, default=None, help="low-rank expert of this rank (default: full expert)")
    args = parser.parse_args()
    model = build_model(args.rank)
    data = shards(model.tokens_per_image)
    if "WORLD_SIZE" not in os.environ:
        train(model, data, scale=1 / len(data))
        pv.save_adapter(model, args.output)
        return

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    if dist.get_world_size() != len(data):
        raise SystemExit(f"run with --nproc_per_node {len(data)} (one shard per process)")
    for layer in model.language_model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    train(model, [data[dist.get_rank()]], scale=1.0)
    # Sharding replaces every parameter with a sharded one; gather full tensors into an unsharded copy to save them.
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        unsharded = build_model(args.rank)
        unsharded.load_state_dict(full)
        pv.save_adapter(unsharded, args.output)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
