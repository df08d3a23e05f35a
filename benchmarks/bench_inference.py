"""Inference speed: tokens/s of greedy `generate` for the base model, adapted models and merged models.

The floor is the base model itself. A merged model (LoRA or bias/scale folded into the base weights) must run at the
base's speed, which it can only do if merging leaves no module behind: the table also counts the modules each model
runs per forward pass (a merged model should run exactly as many as the base). All models are copies of one random
model (SmolLM2-135M's shape), generating the same tokens from the same prompt, alternating call by call; each figure
is the median after warm-up. A second copy of the base, timed like the others, shows the noise of the run.

    python benchmarks/bench_inference.py
    python benchmarks/bench_inference.py --merged-only --steps 40    # the merged-vs-base check alone, more calls
    python benchmarks/bench_inference.py --quick --shape tiny --no-record   # smoke test
"""
from __future__ import annotations

import copy

import peft
import torch

import peft_vlm as pv
import common  # this folder is on sys.path when a script here runs

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def trained(model):
    """Move every trainable tensor off its initial value, so that adapters (and merging) change the weights."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in common.trainable(model):
            noise = torch.randn(parameter.shape, generator=generator).to(parameter.device, parameter.dtype)
            parameter.add_(0.01 * noise)
    return model


def lora(model):
    return trained(pv.apply(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=PROJECTIONS)))


def bias_scale(model):
    return trained(pv.apply(model, pv.BiasScaleConfig()))


VARIANTS = {
    "base": lambda m: m,
    "base, second copy": lambda m: m,  # an A/A pair: how far two identical models differ is the noise of the run
    "adaption prompt (K=10, L=28)": lambda m: trained(pv.apply(m, pv.AdaptionPromptConfig(
        length=10, layers=min(28, m.config.num_hidden_layers)))),
    "LoRA r=8": lora,
    "LoRA r=8, merged": lambda m: pv.merge(lora(m)),
    "bias/scale": bias_scale,
    "bias/scale, merged": lambda m: pv.merge(bias_scale(m)),
}


def modules_per_forward(model, input_ids: torch.Tensor) -> int:
    calls = [0]

    def count(module, args, output):
        calls[0] += 1

    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        handle.remove()
    return calls[0]


def main(argv=None) -> None:
    parser = common.parser(__doc__.split("\n")[0], steps=15, warmup=2)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--new", type=int, default=32, help="generated tokens")
    parser.add_argument("--merged-only", action="store_true", help="only the base (twice) and the merged models")
    args = common.parse(parser, argv)
    if args.quick:
        args.steps, args.warmup, args.new = min(args.steps, 3), min(args.warmup, 1), 8
    dtype = common.dtype_for(args.device)
    base = common.build_base(args.shape, dtype, args.device).eval()
    prompt = common.random_batch(base.config.vocab_size, 1, args.prompt, args.device)
    chosen = [n for n in VARIANTS if not args.merged_only or n.startswith("base") or n.endswith("merged")]
    models = {name: VARIANTS[name](copy.deepcopy(base)).eval() for name in chosen}
    options = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False)

    def generate(model):
        with torch.no_grad():
            return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **options)

    outputs = {name: generate(model) for name, model in models.items()}
    load_before = common.load_average()
    medians = common.side_by_side({n: (lambda m=m: generate(m)) for n, m in models.items()}, args.steps, args.warmup,
                                  args.device)
    load_after = common.load_average()
    base_modules = modules_per_forward(base, prompt)
    rows = [
        [name, f"{args.new / medians[name]:.1f}", f"{medians['base'] / medians[name]:.3f}",
         modules_per_forward(model, prompt) - base_modules,
         "yes" if torch.equal(outputs[name][:, args.prompt:], outputs["base"][:, args.prompt:]) else "no"]
        for name, model in models.items()
    ]
    header = ["model", "tokens/s", "speed vs base", "extra modules per forward", "same tokens as base"]
    lines = common.table(header, rows)
    merged = [n for n in models if n.endswith("merged") or n == "base, second copy"]
    notes = [f"- {name}: {medians['base'] / medians[name]:.3f} of the base's speed" for name in merged]
    notes.append(f"- load average {load_before} before, {load_after} after")
    setup = (f"{args.shape} shape, random weights, {str(dtype).removeprefix('torch.')}, batch 1, prompt {args.prompt} "
             f"tokens, {args.new} new tokens (greedy, KV cache), median of {args.steps} alternating calls after "
             f"{args.warmup} warm-up, device {args.device}, floor = base")
    common.report("bench_inference", setup, lines, notes, args.device, not args.no_record)


if __name__ == "__main__":
    main()
