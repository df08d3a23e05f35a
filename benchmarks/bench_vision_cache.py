"""The training step with and without the vision feature cache (`train.cache_vision_features`), side by side.

Two towers under the main job's step (recipes/llama_adapter_v2_joint.yaml: the embedded SmolLM2-135M, its connector,
the V2 methods, one batch of easy-VQA questions, bf16 autocast where the CPU has native bf16 kernels and the frozen
linear weights held in bf16, as the trainer runs it):

- the recipe's own tower (`embedded_contrastive`, a small ViT at 64 px): the saving is small;
- open_clip's ViT-B-16 architecture at 224 px with random weights (`open_clip.create_model('ViT-B-16',
  pretrained=None)` through the model section's `vision: ViT-B-16`, nothing downloaded), the recipe's pooled token:
  a tower of the size real runs use, where its share of the step is real.

"with cache" is a step of a run whose data repeats, from its second epoch on: every image of the batch is a hit
(the cache is filled before timing, in a temporary folder). "tower share" is the tower's forward alone over the step
without the cache: what the cache can remove at most.

    python benchmarks/bench_vision_cache.py                 # 2 threads, 16 questions, both towers
    python benchmarks/bench_vision_cache.py --quick --no-record
"""
from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import common  # this folder is on sys.path when a script here runs
from bench_cpu_mfu import RECIPE, main_job_batch
from peft_vlm.model.vision_feature_cache import VisionFeatureCache
from peft_vlm.training.config import resolve_mixed_precision
from peft_vlm.training.frozen_weights import frozen_linear_weights_in

TOWERS = {"embedded_contrastive (recipe, 64 px)": None, "ViT-B-16 (random, 224 px)": "ViT-B-16"}


def make_step(model, batch: dict, bf16: bool, cache: VisionFeatureCache | None):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        model.vision_feature_cache = cache
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()

    return step


def measure(model, batch: dict, steps: int, warmup: int, bf16: bool, folder: Path) -> dict[str, float]:
    """Seconds per step without and with the cache (every image a hit), and of the tower's forward alone."""
    model.train()
    cache = VisionFeatureCache(folder)
    runs = {"without": make_step(model, batch, bf16, None), "with": make_step(model, batch, bf16, cache)}
    runs["with"]()  # fills the cache: the timed steps are those of a later epoch
    pixels = batch["pixel_values"]

    def tower():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model.vision_tower(pixels)

    runs["tower"] = tower
    seconds = common.side_by_side(runs, steps, warmup, "cpu")
    model.vision_feature_cache = None
    seconds["hits"] = cache.stats["memory_hits"] + cache.stats["disk_hits"]
    return seconds


def cpu_name() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return "unknown CPU"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")), "unknown CPU")


def main(argv=None) -> None:
    parser = common.parser(__doc__.split("\n", 1)[0], steps=3, warmup=1)
    parser.add_argument("--batch", type=int, default=16, help="questions per step")
    parser.set_defaults(threads=2)
    args = common.parse(parser, argv)
    if args.quick:
        args.steps, args.warmup, args.batch = 2, 1, 4
    bf16 = resolve_mixed_precision("bf16-native") == "bf16"
    start_load, rows = common.load_average(), []
    for label, vision in TOWERS.items():
        model, batch = main_job_batch(RECIPE, args.batch, "eager", vision=vision)
        frozen = frozen_linear_weights_in(model, torch.bfloat16) if bf16 else contextlib.nullcontext()
        with frozen, tempfile.TemporaryDirectory() as folder:
            seconds = measure(model, batch, args.steps, args.warmup, bf16, Path(folder))
        without, cached = seconds["without"], seconds["with"]
        rows.append([label, f"{without:.3f}", f"{cached:.3f}", f"{without / cached:.2f}x",
                     f"{100 * seconds['tower'] / without:.1f}%"])
        del model
    lines = common.table(["tower", "step s without cache", "with cache", "speed-up", "tower share"], rows)
    notes = [f"- CPU: {cpu_name()}, {torch.get_num_threads()} threads, a machine shared with other work (a few steps "
             f"each: figures drift with its load)",
             f"- load average {start_load} at the start, {common.load_average()} at the end"]
    precision = "bf16 autocast" if bf16 else "fp32"
    setup = (f"main job's step ({RECIPE.name}), {args.batch} easy-VQA questions, {precision}, "
             f"frozen linear weights in bf16 {'on' if bf16 else 'off'}; median of {args.steps} alternating steps "
             f"after {args.warmup}; with cache = every image a hit")
    common.report("bench_vision_cache", setup, lines, notes, "cpu", not args.no_record)


if __name__ == "__main__":
    sys.exit(main())
