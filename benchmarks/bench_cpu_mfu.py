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

import contextlib
import sys
import time
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


def cpu_kind() -> str:
    """The CPU's model name and the matrix-unit flags that decide its bf16 rate (AMX tiles, AVX-512 BF16)."""
    fields = {}
    with open("/proc/cpuinfo") as info:
        for line in info:
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    units = [flag for flag in ("amx_tile", "amx_bf16", "avx512_bf16", "avx512f", "avx2") if flag in flags]
    return f"{fields.get('model name', 'unknown CPU')} ({', '.join(units) or 'no AVX2'})"


def step_shapes(tokens: int, span: int, config) -> dict[str, tuple[int, int, int]]:
    """Every (rows, inner, columns) matmul shape of the step's projections, and a large square product."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    hidden, kv = config.hidden_size, config.num_key_value_heads * head_dim
    return {
        "q / o projection": (tokens, hidden, hidden),
        "k / v projection": (tokens, hidden, kv),
        "gate / up projection": (tokens, hidden, config.intermediate_size),
        "down projection": (tokens, config.intermediate_size, hidden),
        "LM head on the supervised span": (span, hidden, config.vocab_size),
        "2048^3": (2048, 2048, 2048),
    }


def ceilings(shapes: dict[str, tuple[int, int, int]]) -> tuple[dict[str, float], list[list]]:
    """The best measured matmul FLOP/s per dtype over the step's own shapes (bf16 only where the CPU has bf16
    kernels: emulated, a 2048^3 product alone takes seconds), and a row per shape."""
    dtypes = {"fp32": torch.float32, **({"bf16": torch.bfloat16} if native_bf16() else {})}
    rates = {(label, name): matmul_rate(*shape, dtype, 4 if shape[0] >= 2048 else 10)
             for label, shape in shapes.items() for name, dtype in dtypes.items()}
    best = {name: max(rate for (_, dtype), rate in rates.items() if dtype == name) for name in dtypes}
    rows = [[label, " x ".join(map(str, shape))] + [f"{rates[label, name] / 1e9:.0f}" for name in dtypes]
            for label, shape in shapes.items()]
    return best, rows


# How the profiler's operators add up to the step: matrix products outside attention, attention, the optimizer
# (everything under `Optimizer.step`), dtype casts, and the rest (norms, activations, elementwise); what no operator
# accounts for is framework time (Python, dispatch, the autograd engine).
ATTENTION_OPS = ("aten::bmm", "aten::baddbmm", "aten::_softmax", "aten::_softmax_backward_data",
                 "aten::_scaled_dot_product", "aten::_efficient_attention", "aten::_flash_attention")
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::_addmm_activation")
CAST_OPS = ("aten::copy_", "aten::_to_copy")


def _category(event) -> str:
    parent = event
    while parent is not None:
        if parent.name.startswith("Optimizer.step"):
            return "optimizer"
        parent = parent.cpu_parent
    if event.name.startswith(ATTENTION_OPS):
        return "attention"
    if event.name in MATMUL_OPS:
        return "matmuls (projections, LM head)"
    if event.name in CAST_OPS:
        return "dtype casts and copies"
    return "norms, activations, elementwise"


def step_split(step, repeats: int = 2) -> dict[str, float]:
    """Seconds per step by category, from torch.profiler's operator self times (leaf work only)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        wall = (time.perf_counter() - start) / repeats
    split: dict[str, float] = {}
    for event in profiler.events():
        if event.name.startswith("aten::") or event.name.startswith("Optimizer.step"):
            category = _category(event)
            split[category] = split.get(category, 0.0) + event.self_cpu_time_total / 1e6 / repeats
    split["framework (Python, dispatch, autograd engine)"] = max(0.0, wall - sum(split.values()))
    return {"wall": wall, **split}


def make_step(model, batch: dict, bf16: bool, full_head: bool, fused: bool = False):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                                  **({"fused": True} if fused else {}))
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


LEAN = "+ LM head on the supervised span"


def variants_of(models: dict[str, object]) -> dict[str, tuple]:
    """Each lever added to the one before it: name -> (model, bf16 autocast, full LM head, fused AdamW)."""
    variants = {
        "reference: fp32, full LM head, SDPA": (models["sdpa"], False, True, False),
        LEAN: (models["sdpa"], False, False, False),
        "+ bf16 autocast": (models["sdpa"], True, False, False),
        "+ plain-matmul attention (bf16)": (models["eager"], True, False, False),
        "+ frozen linear weights held in bf16": (models["frozen_bf16"], True, False, False),
        "+ fused AdamW": (models["frozen_bf16"], True, False, True),
        "plain-matmul attention, fp32": (models["eager"], False, False, False),
    }
    if "compiled" in models:
        variants["+ torch.compile of the decoder layers"] = (models["compiled"], True, False, True)
    if not native_bf16():  # emulated bf16 (an AVX2-only CPU) is ~50x slower than fp32: no lever to measure there
        variants = {name: variant for name, variant in variants.items() if not variant[1]}
    return variants


def measure(models: dict[str, object], batch: dict, steps: int, warmup: int, ceiling: dict[str, float]):
    """`models`: {"sdpa", "eager", "frozen_bf16"[, "compiled"]: model} (same weights). Rows: variant, dtype, s/step,
    speed-up, MFU against the dtype's own-shape ceiling and against the chip's limit (the best rate of any dtype)."""
    variants = variants_of(models)
    steps_by_name = {name: make_step(model, batch, bf16, full, fused)
                     for name, (model, bf16, full, fused) in variants.items()}
    for model in models.values():
        model.train()
    useful = step_flops(steps_by_name[LEAN])
    seconds = common.side_by_side(steps_by_name, steps, warmup, "cpu")
    reference = seconds["reference: fp32, full LM head, SDPA"]
    limit = max(ceiling.values())
    rows = []
    for name, (_, bf16, *_) in variants.items():
        dtype = "bf16" if bf16 else "fp32"
        rate = useful / seconds[name]
        rows.append([name, dtype, f"{seconds[name]:.3f}", f"{reference / seconds[name]:.2f}x",
                     f"{100 * rate / ceiling[dtype]:.1f}%", f"{100 * rate / limit:.1f}%"])
    return rows, useful, seconds, steps_by_name


def compile_decoder_layers(model) -> None:
    """`torch.compile` each decoder layer in place (inductor's C++ backend on CPU)."""
    for layer in model.language_model.model.layers:
        layer.compile()


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
    parser.add_argument("--compile", action="store_true", help="add a torch.compile row (minutes of compiling)")
    parser.set_defaults(threads=2)
    args = common.parse(parser, argv)
    if args.quick:
        args.steps, args.warmup = 2, 1
    models, batch = {}, None
    for attn in ("sdpa", "eager"):
        models[attn], batch = main_job_batch(args.recipe, args.batch, attn)
    models["frozen_bf16"], _ = main_job_batch(args.recipe, args.batch, "eager")
    with contextlib.ExitStack() as stack:  # frozen weights in bf16 as the trainer holds them: the whole run
        stack.enter_context(frozen_linear_weights_in(models["frozen_bf16"], torch.bfloat16))
        if args.compile:
            models["compiled"], _ = main_job_batch(args.recipe, args.batch, "eager")
            stack.enter_context(frozen_linear_weights_in(models["compiled"], torch.bfloat16))
            compile_decoder_layers(models["compiled"])
        run(args, models, batch)


def run(args, models: dict, batch: dict) -> None:
    config = models["sdpa"].language_model.config
    start_load = common.load_average()
    tokens = batch["input_ids"].numel()
    span = int((batch["labels"] != -100).sum()) if "labels" in batch else tokens
    ceiling, shape_rows = ceilings(step_shapes(tokens, span, config))
    rows, useful, seconds, steps = measure(models, batch, args.steps, args.warmup, ceiling)
    padding = 1 - float(batch["attention_mask"].float().mean())
    fastest = min(seconds, key=seconds.get)
    split = step_split(steps[fastest])
    wall = split.pop("wall")
    notes = [
        f"- CPU: {cpu_kind()}",
        "- own-shape ceiling (measured in this run, GFLOP/s): "
        + ", ".join(f"{name} {rate / 1e9:.0f}" for name, rate in ceiling.items())
        + f"; chip limit {max(ceiling.values()) / 1e9:.0f}; useful FLOPs per step {useful / 1e9:.1f} G "
        f"({tokens} positions, {span} supervised, {args.batch} questions)",
        f"- what the remaining levers could save at most: the frozen tower's forward is "
        f"{100 * tower_share(models['eager'], batch, seconds[fastest]):.1f}% of the fastest step (features cached "
        f"per image), padding is {100 * padding:.1f}% of the positions (length grouping / packing)",
        f"- load average {start_load} at the start, {common.load_average()} at the end",
    ]
    if not native_bf16():
        notes.append("- no bf16 rows: this CPU has no native bf16 kernels (oneDNN, AVX-512 or AMX), so bf16 is "
                     "emulated and the recipe's `mixed_precision: bf16-native` trains in fp32")
    setup = (f"main job's step ({args.recipe.name}), {args.batch} easy-VQA questions, {torch.get_num_threads()} "
             f"threads; median of {args.steps} steps after {args.warmup}")
    lines = common.table(["variant", "dtype", "s / step", "speed-up", "MFU (own dtype)", "MFU (chip limit)"], rows)
    lines += ["", *common.table(["matmul shape", "rows x inner x columns", *(f"{n} GFLOP/s" for n in ceiling)],
                                shape_rows)]
    lines += ["", *common.table([f"where the fastest step's time goes ({fastest}, profiled)", "s / step", "share"],
                                [[name, f"{value:.3f}", f"{100 * value / wall:.1f}%"]
                                 for name, value in sorted(split.items(), key=lambda item: -item[1])])]
    common.report("bench_cpu_mfu", setup, lines, notes, "cpu", not args.no_record)


if __name__ == "__main__":
    sys.exit(main())
