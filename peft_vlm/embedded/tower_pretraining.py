"""A small vision tower pretrained once, contrastively, on easy-vqa's training images and captions; then frozen.

No CLIP weights ship offline, and a randomly initialised tower is a poor start: its features tell colours apart but
barely shapes, and a frozen language model does not learn to read them in a few hundred CPU steps. Here a small
open_clip model (image and text tower) learns to match each training image with its caption ("A red circle.") with
CLIP's contrastive loss, in a few minutes on a CPU. Captions repeat (8 colours x 3 shapes), so an image's
positives are all images and captions of the batch with the same caption (CLIP's loss would count those as
negatives). The whole open_clip model is saved (safetensors) under `cache_root()`, keyed by a hash of the recipe, so
every later run loads it in a second: `VisionLanguageModel.from_pretrained(..., vision=name, vision_pretrained=path)`.

    path = pretrained_tower()          # trains on first use (minutes), then reads the cache
    model = pv.VisionLanguageModel.from_pretrained(lm, vision=PRETRAINED_VISION, vision_pretrained=path)
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from peft_vlm.embedded.models import TOWER_CACHE, cache_root, fill_once, register_open_clip_config

# Smaller than the default ViT-S: 4 blocks of width 192 over 64 patch tokens (64x64 images, patch 8) train fast.
PRETRAINED_VISION = "ViT-T-8-64"
PRETRAINED_VISION_CONFIG = {
    "embed_dim": 192,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 192, "patch_size": 8, "head_width": 64},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
}


@dataclass(frozen=True)
class TowerRecipe:
    """Everything that decides the pretrained weights (its hash names the cache file)."""

    model: str = PRETRAINED_VISION
    steps: int = 400  # 97.6% zero-shot caption match, against 94.4% after 300 (benchmarks/VISION_LEVERS.md)
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    split: str = "train"
    limit: int | None = None  # first `limit` captioned images (tests)
    seed: int = 0

    def key(self) -> str:
        config = PRETRAINED_VISION_CONFIG if self.model == PRETRAINED_VISION else None
        text = json.dumps({"recipe": asdict(self), "config": config, "version": 1}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def register_pretrained_vision() -> str:
    """Make `PRETRAINED_VISION` known to open_clip (idempotent); returns its name."""
    return register_open_clip_config(PRETRAINED_VISION, PRETRAINED_VISION_CONFIG)


def caption_pairs(split: str = "train", limit: int | None = None) -> list[tuple[str, str]]:
    """(image path, caption) for every image whose caption easy-vqa's questions decide."""
    from peft_vlm.data import easy_vqa as ev

    return [(s["images"][0], s["messages"][1]["content"]) for s in ev.caption_samples(split).samples[:limit]]


def contrastive_loss(images: torch.Tensor, texts: torch.Tensor, captions: list[str],
                     scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy on normalised embeddings, every same-caption pair a positive."""
    logits = scale * F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).T
    ids = torch.tensor([hash(c) for c in captions])
    same = (ids[:, None] == ids[None, :]).float()
    targets = same / same.sum(1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def train_tower(recipe: TowerRecipe, log_every: int = 50):
    """Contrastive training of a fresh open_clip model; returns (model, tokenizer, preprocess)."""
    import open_clip
    from PIL import Image

    register_pretrained_vision()
    torch.manual_seed(recipe.seed)
    model, _, preprocess = open_clip.create_model_and_transforms(recipe.model, pretrained=None)
    tokenizer = open_clip.get_tokenizer(recipe.model)
    pairs = caption_pairs(recipe.split, recipe.limit)
    pixels = torch.stack([preprocess(Image.open(path).convert("RGB")) for path, _ in pairs])  # 4,000 x 48 KB
    tokens = tokenizer([caption for _, caption in pairs])
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, recipe.learning_rate, total_steps=recipe.steps,
                                                   pct_start=0.1)
    generator = torch.Generator().manual_seed(recipe.seed)
    model.train()
    start = time.time()
    for step in range(recipe.steps):
        batch = torch.randint(len(pairs), (min(recipe.batch_size, len(pairs)),), generator=generator)
        loss = contrastive_loss(model.encode_image(pixels[batch]), model.encode_text(tokens[batch]),
                                [pairs[i][1] for i in batch.tolist()], model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"tower pretraining step {step + 1}/{recipe.steps}  loss {loss.item():.3f}  "
                  f"({time.time() - start:.0f} s)")
    return model.eval(), tokenizer, preprocess


@torch.no_grad()
def caption_accuracy(model, tokenizer, preprocess, split: str = "test", limit: int | None = 500) -> float:
    """Share of images whose nearest caption, among all colour x shape captions, is their own (zero-shot)."""
    from PIL import Image

    from peft_vlm.data.easy_vqa import COLORS, SHAPES

    captions = [f"A {color} {shape}." for color in COLORS for shape in SHAPES]
    texts = F.normalize(model.encode_text(tokenizer(captions)), dim=-1)
    pairs = caption_pairs(split, limit)
    images = torch.stack([preprocess(Image.open(path).convert("RGB")) for path, _ in pairs])
    guesses = (F.normalize(model.encode_image(images), dim=-1) @ texts.T).argmax(1)
    return sum(captions[g] == c for g, (_, c) in zip(guesses.tolist(), pairs)) / len(pairs)


def pretrained_tower(recipe: TowerRecipe | None = None, **options) -> str:
    """Path of the open_clip checkpoint for `recipe` (or `TowerRecipe(**options)`), trained and cached on first use;
    pass it as `vision_pretrained=` with `vision=recipe.model`."""
    recipe = recipe or TowerRecipe(**options)
    register_pretrained_vision()
    path = cache_root() / TOWER_CACHE / f"{recipe.model}-easyvqa-{recipe.key()}.safetensors"

    def pretrain(partial):  # a process starting at the same time waits for this one, then reads its file
        print(f"vision tower: first use, pretraining {recipe.model} contrastively on easy-vqa ({recipe.steps} "
              f"steps); cached in {path.parent}")
        with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was, trained or cached
            model, _, _ = train_tower(recipe)
        save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, str(partial))

    return str(fill_once(path, pretrain))
