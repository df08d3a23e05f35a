"""Training step of each method against its peer and its floor: same model, same batch, measured side by side.

Each group runs copies of one frozen model (random weights), one step of each variant in turn, and reports the median
step time after warm-up and the step's memory (CUDA: peak allocated; CPU: bytes saved for backward), as ratios:

- adaption prompts: ours vs peft `AdaptionPrompt` (K=10 on the top 28 of 30 layers).
- LoRA: ours (`pv.apply(model, LoraConfig)`) vs plain `peft.get_peft_model` with the same config (r=8, all seven
  projections of every layer).
- bias/scale vs peft IA3, the closest peer (a learned per-feature scale): both on k_proj, v_proj and down_proj;
  the paper's setting (every linear layer and the RMSNorm weights) is shown beside them.
- visual expert, low rank (r=8) and full, vs plain LoRA at the same rank on the same projections. A quarter of each
  sequence is marked as image tokens (`pv.token_types`), which every variant of the group runs with.

The floor of every group is the same frozen model whose only trainable tensor is one scale at the input of the
lowest adapted layer (`common.add_floor_scale`): the backward pass any method on those layers must run, and nothing
more. "vs floor" is the distance to that limit.

    python benchmarks/bench_training_step.py                          # every group
    python benchmarks/bench_training_step.py --only lora,visual_expert
    python benchmarks/bench_training_step.py --quick --shape tiny --no-record   # smoke test
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable

import peft
import torch

import peft_vlm as pv
import common  # this folder is on sys.path when a script here runs

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IA3_TARGETS = ["k_proj", "v_proj", "down_proj"]
ADAPTED_TOP_LAYERS = 28
IMAGE_SHARE = 4  # one position in four is an image token in the visual expert group


def lora_config() -> peft.LoraConfig:
    return peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=PROJECTIONS)


def top_layers(base) -> int:
    return min(ADAPTED_TOP_LAYERS, base.config.num_hidden_layers)


# name -> builder(base) -> model; the first entry of a group is "ours", the second its peer.
GROUPS: dict[str, dict[str, Callable]] = {
    "adaption_prompt": {
        "peft_vlm adaption prompt": lambda m: common.open_gates(
            pv.apply(m, pv.AdaptionPromptConfig(length=10, layers=top_layers(m)))),
        "peft AdaptionPrompt": lambda m: common.open_gates(peft.get_peft_model(m, peft.AdaptionPromptConfig(
            adapter_len=10, adapter_layers=top_layers(m), task_type="CAUSAL_LM"))),
        "floor": lambda m: common.add_floor_scale(m, m.config.num_hidden_layers - top_layers(m)),
    },
    "lora": {
        "peft_vlm LoRA": lambda m: pv.apply(m, lora_config()),
        "peft LoRA": lambda m: peft.get_peft_model(m, lora_config()),
        "floor": lambda m: common.add_floor_scale(m, 0),
    },
    "bias_scale": {
        "peft_vlm bias/scale (k, v, down)": lambda m: pv.apply(m, pv.BiasScaleConfig(targets=IA3_TARGETS, norms=False)),
        "peft IA3 (k, v, down)": lambda m: peft.get_peft_model(m, peft.IA3Config(
            target_modules=IA3_TARGETS, feedforward_modules=["down_proj"], task_type="CAUSAL_LM")),
        "peft_vlm bias/scale (all linear + norms)": lambda m: pv.apply(m, pv.BiasScaleConfig()),
        "floor": lambda m: common.add_floor_scale(m, 0),
    },
    "visual_expert": {
        "visual expert r=8": lambda m: pv.apply(m, pv.VisualExpertConfig(rank=8, alpha=16)),
        "peft_vlm LoRA r=8": lambda m: pv.apply(m, lora_config()),
        "visual expert full": lambda m: pv.apply(m, pv.VisualExpertConfig()),
        "floor": lambda m: common.add_floor_scale(m, 0),
    },
}


def image_tokens(batch: torch.Tensor) -> Callable:
    """A context that marks the middle quarter of every sequence as image tokens (for models built with pv.apply)."""
    types = torch.zeros_like(batch)
    length = batch.shape[1]
    types[:, length // 2 - length // (2 * IMAGE_SHARE): length // 2 + length // (2 * IMAGE_SHARE)] = 1

    def around(model):
        if (pv.runtime.lm_layers.language_model_of(model) is model
                and pv.runtime.tracking.state_of(model, create=False) is not None):
            return pv.token_types(model, types)
        return contextlib.nullcontext()

    return around


def run_group(name: str, base, batch, args) -> tuple[list[str], str]:
    builders = GROUPS[name]
    around = image_tokens(batch) if name == "visual_expert" else None
    models = {variant: build(copy.deepcopy(base)) for variant, build in builders.items()}
    runs = {variant: common.make_step(model, batch, around) for variant, model in models.items()}
    load_before = common.load_average()
    medians = common.side_by_side(runs, args.steps, args.warmup, args.device)
    load_after = common.load_average()
    memory = {variant: common.step_memory(step, models[variant], args.device) for variant, step in runs.items()}
    ours, peer = list(builders)[:2]
    rows = [
        [variant, f"{sum(p.numel() for p in common.trainable(models[variant])):,}", f"{1000 * medians[variant]:.1f}",
         f"{medians[variant] / medians[peer]:.3f}", f"{medians[variant] / medians['floor']:.3f}",
         f"{memory[variant][1] / 2**20:.1f}", f"{memory[variant][1] / memory[peer][1]:.3f}"]
        for variant in builders
    ]
    note = (f"{name}: {ours} / {peer} = {medians[ours] / medians[peer]:.3f} (time), "
            f"{memory[ours][1] / memory[peer][1]:.3f} ({memory[ours][0]}); {ours} / floor = "
            f"{medians[ours] / medians['floor']:.3f}; load average {load_before} before, {load_after} after")
    return rows, note


def main(argv=None) -> None:
    parser = common.parser(__doc__.split("\n")[0], steps=15, warmup=2)
    parser.add_argument("--only", help=f"comma-separated groups among {', '.join(GROUPS)}")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq", type=int)
    args = common.parse(parser, argv)
    cuda = args.device == "cuda"
    if args.quick:
        args.steps, args.warmup = min(args.steps, 5), min(args.warmup, 1)
    rows_per_batch = args.batch or (8 if cuda else 1)
    seq = args.seq or (1024 if cuda else (128 if args.quick else 256))
    groups = args.only.split(",") if args.only else list(GROUPS)
    dtype = common.dtype_for(args.device)
    base = common.build_base(args.shape, dtype, args.device)
    batch = common.random_batch(base.config.vocab_size, rows_per_batch, seq, args.device)
    rows, notes = [], []
    for name in groups:
        group_rows, note = run_group(name, base, batch, args)
        rows += group_rows
        notes.append(f"- {note}")
    memory_kind = "peak allocated" if cuda else "saved for backward"
    lines = common.table(["variant", "trainable", "step (ms)", "vs peer", "vs floor", f"{memory_kind} (MiB)",
                          "memory vs peer"], rows)
    setup = (f"{args.shape} shape, random weights, {str(dtype).removeprefix('torch.')}, batch {rows_per_batch} x {seq} "
             f"tokens, AdamW, median of {args.steps} alternating steps after {args.warmup} warm-up, "
             f"device {args.device}; "
             "peer = second row of each group")
    common.report("bench_training_step", setup, lines, notes, args.device, not args.no_record)


if __name__ == "__main__":
    main()
