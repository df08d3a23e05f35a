"""Each method's training step on the embedded default, side by side, as a ratio to the main job's (V2) step.

Every method's recipe (`recipes/easy_vqa/`, the main job for V2) builds its model and one batch of its own training
questions (16 by default) through its encoder and collator; forward + backward + AdamW in bf16 autocast with the
frozen linear weights in bf16, as the trainer runs them. The steps are timed side by side (one step of each in turn,
the median after warm-up), so a loaded machine slows all of them alike. Flamingo is measured in both layouts: with
the resampler's 64 latents kept in the token sequence (every frozen layer carries them) and in the paper's, where
the images reach the text only through the gated cross-attention blocks.

    python benchmarks/bench_method_steps.py                      # every method, 1 thread
    python benchmarks/bench_method_steps.py --only flamingo --no-record
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

import common  # this folder is on sys.path when a script here runs
from bench_cpu_mfu import main_job_batch, make_step
from peft_vlm.training.config import native_bf16
from peft_vlm.training.frozen_weights import frozen_linear_weights_in

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = "LLaMA-Adapter V2 (main job)"
# name -> (recipe, method overrides)
METHODS = {
    REFERENCE: ("recipes/llama_adapter_v2_joint.yaml", None),
    "LLaVA projector + LoRA": ("recipes/easy_vqa/llava_lora.yaml", None),
    "CogVLM visual expert + LoRA": ("recipes/easy_vqa/cogvlm_expert.yaml", None),
    "LLaMA-Adapter v1 multimodal": ("recipes/easy_vqa/llama_adapter_v1.yaml", None),
    "BLIP-2 Q-Former": ("recipes/easy_vqa/blip2_qformer.yaml", None),
    "Flamingo, latents in the sequence": (
        "recipes/easy_vqa/flamingo.yaml", [{"method": "gated_cross_attention", "every": 4}]),
    "Flamingo, paper layout (recipe)": ("recipes/easy_vqa/flamingo.yaml", None),
}


def main(argv=None) -> None:
    parser = common.parser(__doc__.split("\n", 1)[0], steps=5, warmup=2)
    parser.add_argument("--batch", type=int, default=16, help="questions per step")
    parser.add_argument("--only", help="comma-separated substrings of the method names (the reference always runs)")
    args = common.parse(parser, argv)
    if args.quick:
        args.steps, args.warmup = 2, 1
    names = [n for n in METHODS if n == REFERENCE or not args.only
             or any(part.strip().lower() in n.lower() for part in args.only.split(","))]
    bf16 = native_bf16()
    steps, tokens, trainable, models = {}, {}, {}, []
    for name in names:
        recipe, methods = METHODS[name]
        model, batch = main_job_batch(ROOT / recipe, args.batch, "eager", methods=methods)
        models.append(model)
        steps[name] = make_step(model, batch, bf16, full_head=False)
        tokens[name] = batch["input_ids"].numel()
        trainable[name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for model in models:
        model.train()
    with contextlib.ExitStack() as stack:  # as the trainer holds them: the whole run
        for model in models if bf16 else []:
            stack.enter_context(frozen_linear_weights_in(model, torch.bfloat16))
        seconds = common.side_by_side(steps, args.steps, args.warmup, "cpu")
    rows = [[name, tokens[name], f"{trainable[name]:,}", f"{seconds[name]:.2f}",
             f"{seconds[name] / seconds[REFERENCE]:.2f}x"] for name in names]
    setup = (f"one training step per method, {args.batch} easy-VQA questions of its own recipe's stream, "
             f"{'bf16 autocast' if bf16 else 'fp32'}, {torch.get_num_threads()} thread(s); median of {args.steps} "
             f"steps after {args.warmup}, side by side")
    lines = common.table(["method", "positions", "trainable", "s / step", f"vs {REFERENCE}"], rows)
    notes = [f"- load average {common.load_average()} at the end (the steps alternate, so load slows all alike)"]
    common.report("bench_method_steps", setup, lines, notes, "cpu", not args.no_record)


if __name__ == "__main__":
    sys.exit(main())
