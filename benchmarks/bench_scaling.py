"""How a training step's cost grows, per method: with the sequence length (128..2048) and with the number of visual
tokens (0..576 image positions after 128 text tokens).

Every method runs on a copy of one random model; at each size the methods alternate step by step and each figure is
the median after warm-up. The floor (one trainable scale at the input of the lowest layer, `common.add_floor_scale`)
is timed beside them, so "vs floor" shows whether a method's overhead grows faster than the model's own cost. In both
sweeps a quarter of the positions (the middle quarter), or the visual tokens, are marked as image tokens; only the
visual experts route them differently (the full expert's trained copy runs on the image positions alone).

    python benchmarks/bench_scaling.py
    python benchmarks/bench_scaling.py --layers 8          # fewer decoder layers of the same width, for slow CPUs
    python benchmarks/bench_scaling.py --quick --shape tiny --no-record   # smoke test
"""
from __future__ import annotations

import copy

import peft
import torch

import peft_vlm as pv
import common  # this folder is on sys.path when a script here runs

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = {
    "floor": lambda m: common.add_floor_scale(m, 0),
    "adaption prompt": lambda m: common.open_gates(pv.apply(m, pv.AdaptionPromptConfig(length=10, layers=1000))),
    "LoRA r=8": lambda m: pv.apply(m, peft.LoraConfig(r=8, lora_alpha=16, target_modules=PROJECTIONS)),
    "bias/scale": lambda m: pv.apply(m, pv.BiasScaleConfig()),
    "visual expert r=8": lambda m: pv.apply(m, pv.VisualExpertConfig(rank=8, alpha=16)),
    "visual expert full": lambda m: pv.apply(m, pv.VisualExpertConfig()),
}


def with_types(types: torch.Tensor):
    def around(model):
        return pv.token_types(model, types)

    return around


def sweep(models: dict, sizes: list[tuple[int, int]], args) -> tuple[list[list[str]], list[str]]:
    """Rows of median step times (ms) per method for each (text tokens, image tokens), and the load averages."""
    rows = {name: [name] for name in models}
    loads = []
    vocab = next(iter(models.values())).config.vocab_size
    for text, image in sizes:
        batch = common.random_batch(vocab, 1, text + image, args.device)
        types = torch.zeros_like(batch)
        types[:, text // 2: text // 2 + image] = 1  # image tokens after the first half of the text
        runs = {name: common.make_step(model, batch, None if name == "floor" else with_types(types))
                for name, model in models.items()}
        loads.append(common.load_average())
        medians = common.side_by_side(runs, args.steps, args.warmup, args.device)
        for name in models:
            rows[name].append(f"{1000 * medians[name]:.0f} ({medians[name] / medians['floor']:.2f})")
    return list(rows.values()), loads


def main(argv=None) -> None:
    parser = common.parser(__doc__.split("\n")[0], steps=3, warmup=1)
    parser.add_argument("--layers", type=int, help="decoder layers (default: the shape's)")
    args = common.parse(parser, argv)
    lengths, visual = [128, 256, 512, 1024, 2048], [0, 64, 144, 256, 576]
    if args.quick:
        args.steps, args.warmup, lengths, visual = 1, 0, [32, 64], [0, 16]
    dtype = common.dtype_for(args.device)
    base = common.build_base(args.shape, dtype, args.device)
    if args.layers:
        base.model.layers = base.model.layers[: args.layers]
        base.config.num_hidden_layers = args.layers
    models = {name: build(copy.deepcopy(base)) for name, build in METHODS.items()}
    by_length, loads_length = sweep(models, [(n - n // 4, n // 4) for n in lengths], args)
    by_visual, loads_visual = sweep(models, [(128, n) for n in visual], args)
    lines = [
        *common.table(["method \\ sequence length"] + [str(n) for n in lengths], by_length), "",
        *common.table(["method \\ visual tokens (+128 text)"] + [str(n) for n in visual], by_visual),
    ]
    notes = [
        "- cells: median step in ms (ratio to the floor at that size)",
        f"- load average at the start of each size: lengths {', '.join(loads_length)}; visual tokens "
        f"{', '.join(loads_visual)}",
    ]
    setup = (f"{args.shape} shape with {base.config.num_hidden_layers} decoder layers, random weights, "
             f"{str(dtype).removeprefix('torch.')}, batch 1, AdamW, median of {args.steps} alternating steps after "
             f"{args.warmup} warm-up per size, device {args.device}")
    common.report("bench_scaling", setup, lines, notes, args.device, not args.no_record)


if __name__ == "__main__":
    main()
