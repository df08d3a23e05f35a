"""Training-step time of LLaMA-Adapter prompts: peft_vlm's, peft's `AdaptionPrompt`, and the floor.

The floor is the same frozen model whose only trainable tensor is one scale at the input of the lowest adapted
layer (`common.add_floor_scale`): its backward pass runs through the same layers as any adapter on the top L layers,
so no implementation can be cheaper. peft's AdaptionPrompt wraps each attention module and recomputes the query
projection and rotary embedding; ours reuses the rotated query inside the attention function. The three variants run
on copies of one model (SmolLM2-135M's shape, random weights), alternating step by step; each time is the median
after warm-up. `bench_training_step.py` runs the same comparison among the other methods'.

    python benchmarks/bench_adaption_prompt.py            # full run
    python benchmarks/bench_adaption_prompt.py --quick    # a quick look

Results are appended to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import copy

import peft

import peft_vlm as pv
import common  # this folder is on sys.path when a script here runs


def ours(base, length: int, layers: int):
    return common.open_gates(pv.apply(base, pv.AdaptionPromptConfig(length=length, layers=layers)))


def peft_adaption_prompt(base, length: int, layers: int):
    config = peft.AdaptionPromptConfig(adapter_len=length, adapter_layers=layers, task_type="CAUSAL_LM")
    return common.open_gates(peft.get_peft_model(base, config))


def floor(base, length: int, layers: int):
    return common.add_floor_scale(base, base.config.num_hidden_layers - layers)


VARIANTS = {"peft_vlm": ours, "peft": peft_adaption_prompt, "floor": floor}


def main(argv=None) -> dict[str, float]:
    parser = common.parser(__doc__.split("\n")[0], steps=40, warmup=5)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--length", type=int, default=10, help="K, prompts per layer")
    parser.add_argument("--layers", type=int, default=28, help="L, adapted top layers")
    args = common.parse(parser, argv)
    cuda = args.device == "cuda"
    batch_size = args.batch or (8 if cuda else 2)
    seq = args.seq or (1024 if cuda else (128 if args.quick else 256))
    steps, warmup = (min(args.steps, 10), min(args.warmup, 2)) if args.quick else (args.steps, args.warmup)
    dtype = common.dtype_for(args.device)
    layers = min(args.layers, common.SHAPES[args.shape]["num_hidden_layers"])

    base = common.build_base(args.shape, dtype, args.device)
    batch = common.random_batch(base.config.vocab_size, batch_size, seq, args.device)
    models = {name: build(copy.deepcopy(base), args.length, layers) for name, build in VARIANTS.items()}
    runs = {name: common.make_step(model, batch) for name, model in models.items()}
    load_before = common.load_average()
    medians = common.side_by_side(runs, steps, warmup, args.device)
    lines = common.table(
        ["variant", "trainable parameters", "median step (ms)", "vs floor"],
        [[name, f"{sum(p.numel() for p in common.trainable(models[name])):,}", f"{1000 * medians[name]:.1f}",
          f"{medians[name] / medians['floor']:.3f}"] for name in runs],
    )
    summary = (
        f"peft_vlm / peft = {medians['peft_vlm'] / medians['peft']:.3f}, "
        f"peft_vlm / floor = {medians['peft_vlm'] / medians['floor']:.3f}; "
        f"load average {load_before} before, {common.load_average()} after"
    )
    setup = (
        f"{args.shape} shape, random weights, {str(dtype).removeprefix('torch.')}, batch {batch_size} x {seq} tokens, "
        f"K={args.length}, L={layers}, {steps} steps after {warmup} warm-up, device {args.device}"
    )
    common.report("bench_adaption_prompt", setup, lines, [summary], args.device, not args.no_record)
    return medians


if __name__ == "__main__":
    main()
