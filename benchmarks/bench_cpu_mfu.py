"""The main job's training step against this CPU's own matmul ceiling (a CPU "MFU"), lever by lever.

The step is `make demo`'s: the embedded SmolLM2-135M with the recipe's tower, connector and V2 methods, one batch of
easy-VQA questions (16 by default) through the recipe's encoder and collator, forward + backward + AdamW. Each
variant adds one lever to the one before it, and all are timed side by side (one step of each in turn, the median
after warm-up), in the same process as the ceiling:

- ceiling: `a @ b` FLOP/s in fp32 and in bf16 at the step's largest projection shape (tokens x 576 x 1536) and at
  2048^3, measured here and now (shared machines drift);
- useful FLOPs: the matmul FLOPs (torch's FlopCounterMode) of one step of the lean variant (the LM head on the
  supervised positions only), the work the step cannot do without; MFU = useful FLOPs / step time / ceiling of the
  variant's dtype (the larger of the two shapes' rates);
- levers: the LM head on the supervised span (`VisionLanguageModel.forward` does it when labels are given), bf16
  autocast, plain-matmul attention (`attn_implementation: eager`; the fused CPU SDPA kernels are slow in bf16 at
  these lengths), frozen linear weights held in bf16 (`train.frozen_linears_in_bf16`: autocast no longer casts them
  in every forward), and what the remaining levers could at most save: the frozen tower's share of the step (features
  computed once per image would remove it), the padding share of the batch's positions (length grouping or packing
  would remove it); "no backward below the lowest trained layer" does not apply: bias/scale trains layer 0.
  On a CPU without native bf16 kernels (AVX2 only) the bf16 rows are left out: bf16 is emulated there, and the
  recipe (`mixed_precision: bf16-native`) trains in fp32.

    python benchmarks/bench_cpu_mfu.py                 # 2 threads, 16 questions, the main recipe
    python benchmarks/bench_cpu_mfu.py --threads 1 --batch 32 --no-record
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import common  # this folder is on sys.path when a script here runs
from peft_vlm.training.config import native_bf16
from peft_vlm.training.frozen_weights import frozen_linear_weights_in

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "llama_adapter_v2_joint.yaml"


def matmul_rate(rows: int, inner: int, columns: int, dtype: torch.dtype, repeats: int = 10) -> float:
    a, b = torch.randn(rows, inner, dtype=dtype), torch.randn(inner, columns, dtype=dtype)
    seconds = common.side_by_side({"mm": lambda: a @ b}, repeats, 3, "cpu")["mm"]
    return 2 * rows * inner * columns / seconds


def ceilings(tokens: int, hidden: int, intermediate: int) -> dict[str, float]:
    """The best measured matmul FLOP/s per dtype, over the step's projection shape and a large square one (bf16 only
    where the CPU has bf16 kernels: emulated, a 2048^3 product alone takes seconds)."""
    dtypes = {"fp32": torch.float32, **({"bf16": torch.bfloat16} if native_bf16() else {})}
    return {name: max(matmul_rate(tokens, hidden, intermediate, dtype), matmul_rate(2048, 2048, 2048, dtype, 4))
            for name, dtype in dtypes.items()}


def make_step(model, batch: dict, bf16: bool, full_head: bool):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    options = {"logits_to_keep": 0} if full_head else {}

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch, **options).loss
        loss.backward()
        optimizer.step()

    return step


def step_flops(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def measure(models: dict[str, object], batch: dict, steps: int, warmup: int, ceiling: dict[str, float]) -> list[list]:
    """`models`: {"sdpa", "eager", "frozen_bf16": model} (same weights). Rows: variant, dtype, s/step, speed-up, MFU."""
    variants = {
        "reference: fp32, full LM head, SDPA": (models["sdpa"], False, True),
        "+ LM head on the supervised span": (models["sdpa"], False, False),
        "+ bf16 autocast": (models["sdpa"], True, False),
        "+ plain-matmul attention (bf16)": (models["eager"], True, False),
        "+ frozen linear weights held in bf16": (models["frozen_bf16"], True, False),
        "plain-matmul attention, fp32": (models["eager"], False, False),
    }
    if not native_bf16():  # emulated bf16 (an AVX2-only CPU) is ~50x slower than fp32: no lever to measure there
        variants = {name: variant for name, variant in variants.items() if not variant[1]}
    steps_by_name = {name: make_step(model, batch, bf16, full) for name, (model, bf16, full) in variants.items()}
    for model in models.values():
        model.train()
    useful = step_flops(steps_by_name["+ LM head on the supervised span"])
    seconds = common.side_by_side(steps_by_name, steps, warmup, "cpu")
    reference = seconds["reference: fp32, full LM head, SDPA"]
    rows = []
    for name, (_, bf16, _) in variants.items():
        dtype = "bf16" if bf16 else "fp32"
        rows.append([name, dtype, f"{seconds[name]:.3f}", f"{reference / seconds[name]:.2f}x",
                     f"{100 * useful / seconds[name] / ceiling[dtype]:.1f}%"])
    return rows, useful, seconds


def tower_share(model, batch: dict, step_seconds: float, repeats: int = 5) -> float:
    pixels = batch["pixel_values"]
    with torch.no_grad():
        seconds = common.side_by_side({"tower": lambda: model.vision_tower(pixels)}, repeats, 1, "cpu")["tower"]
    return seconds / step_seconds


def main_job_batch(recipe_path: Path, rows: int, attn: str, methods: list | None = None, vision: str | None = None):
    """A recipe's model (methods applied, gates opened so they take part) and one batch of its questions (the
    instruction stream, or the last stage's training stream); `methods` in place of the recipe's, `vision` (an
    open_clip architecture, random weights) in place of its tower."""
    from peft_vlm.data import Collator, SampleEncoder
    from peft_vlm.methods.apply import apply
    from peft_vlm.recipes import build_dataset, build_model, load_recipe, method_specs

    recipe = load_recipe(recipe_path)
    torch.manual_seed(0)
    spec = {**recipe["model"], "attn_implementation": attn}
    if vision is not None:
        spec.update(vision=vision, vision_pretrained=None)
    model = build_model(spec)
    apply(model, *method_specs(recipe["methods"] if methods is None else methods))
    common.open_gates(model)
    data = dict(recipe["data"])
    for stage in recipe.get("stages") or []:  # a staged recipe: its last stage's data, which trains longest
        data.update(stage.get("data") or {})
    encoder = SampleEncoder.for_model(model, resize=data.get("resize", "resize"), max_length=data.get("max_length"))
    dataset = build_dataset(data.get("instructions") or data["train"], encoder, {})
    batch = Collator.for_model(model)([dataset[i * 7] for i in range(rows)])
    return model, {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


def main(argv=None) -> None:
    parser = common.parser(__doc__.split("\n", 1)[0], steps=6, warmup=2)
    parser.add_argument("--batch", type=int, default=16, help="questions per step")
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.set_defaults(threads=2)
    args = common.parse(parser, argv)
    if args.quick:
        args.steps, args.warmup = 2, 1
    models, batch = {}, None
    for attn in ("sdpa", "eager"):
        models[attn], batch = main_job_batch(args.recipe, args.batch, attn)
    models["frozen_bf16"], _ = main_job_batch(args.recipe, args.batch, "eager")
    with frozen_linear_weights_in(models["frozen_bf16"], torch.bfloat16):  # as the trainer holds it: the whole run
        run(args, models, batch)


def run(args, models: dict, batch: dict) -> None:
    config = models["sdpa"].language_model.config
    start_load = common.load_average()
    tokens = batch["input_ids"].numel()
    ceiling = ceilings(tokens, config.hidden_size, config.intermediate_size)
    rows, useful, seconds = measure(models, batch, args.steps, args.warmup, ceiling)
    padding = 1 - float(batch["attention_mask"].float().mean())
    best = min(seconds.values())
    notes = [
        "- ceiling (measured in this run): "
        + ", ".join(f"{name} {rate / 1e9:.0f} GFLOP/s" for name, rate in ceiling.items())
        + f"; useful FLOPs per step {useful / 1e9:.1f} G ({tokens} positions, {args.batch} questions)",
        f"- what the remaining levers could save at most: the frozen tower's forward is "
        f"{100 * tower_share(models['eager'], batch, best):.1f}% of the fastest step (features cached per image), "
        f"padding is {100 * padding:.1f}% of the positions (length grouping / packing)",
        f"- load average {start_load} at the start, {common.load_average()} at the end",
    ]
    if not native_bf16():
        notes.append("- no bf16 rows: this CPU has no native bf16 kernels (oneDNN, AVX-512 or AMX), so bf16 is "
                     "emulated and the recipe's `mixed_precision: bf16-native` trains in fp32")
    setup = (f"main job's step ({args.recipe.name}), {args.batch} easy-VQA questions, {torch.get_num_threads()} "
             f"threads; median of {args.steps} steps after {args.warmup}")
    lines = common.table(["variant", "dtype", "s / step", "speed-up", "MFU (useful FLOPs / ceiling)"], rows)
    common.report("bench_cpu_mfu", setup, lines, notes, "cpu", not args.no_record)


if __name__ == "__main__":
    sys.exit(main())
