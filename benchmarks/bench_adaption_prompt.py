"""Training-step time of LLaMA-Adapter prompts: peft_vlm's, peft's `AdaptionPrompt`, and the floor.

The floor is the same frozen model whose only trainable tensor is one scale at the input of the lowest adapted
layer: its backward pass runs through the same layers as any adapter on the top L layers, so no implementation can
be cheaper. peft's AdaptionPrompt wraps each attention module and recomputes the query projection and rotary
embedding; ours reuses the rotated query inside the attention function. The three variants run on copies of one
model (SmolLM2-135M's shape, random weights), alternating step by step; each time is the median after warm-up.

    python benchmarks/bench_adaption_prompt.py            # full run
    python benchmarks/bench_adaption_prompt.py --quick    # a quick look

Results are appended to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import peft
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import peft_vlm as pv

SMOLLM2_135M = dict(
    hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
    vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True,
)
RESULTS = Path(__file__).with_name("RESULTS.md")


def build_base(dtype: torch.dtype, device: str):
    torch.manual_seed(0)
    config = LlamaConfig(**SMOLLM2_135M)
    config._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(config).to(device, dtype)


def ours(base, length: int, layers: int):
    model = pv.apply(base, pv.AdaptionPromptConfig(length=length, layers=layers))
    with torch.no_grad():  # open gates: the prompts take part in the step as they do in training
        for name, parameter in model.named_parameters():
            if name.endswith("adaption_prompt.gate"):
                parameter.fill_(0.1)
    return model


def peft_adaption_prompt(base, length: int, layers: int):
    config = peft.AdaptionPromptConfig(adapter_len=length, adapter_layers=layers, task_type="CAUSAL_LM")
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("adaption_gate"):
                parameter.fill_(0.1)
    return model


def floor(base, length: int, layers: int):
    """The frozen model with one trainable scale multiplying the input of the lowest adapted layer."""
    for parameter in base.parameters():
        parameter.requires_grad_(False)
    lowest = base.model.layers[len(base.model.layers) - layers]
    lowest.floor_scale = torch.nn.Parameter(torch.ones((), device=base.device, dtype=base.dtype))

    def scale_input(module, args, kwargs):
        if args:
            return (args[0] * module.floor_scale, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * module.floor_scale}

    lowest.register_forward_pre_hook(scale_input, with_kwargs=True)
    return base


VARIANTS = {"peft_vlm": ours, "peft": peft_adaption_prompt, "floor": floor}


def make_step(model, batch):
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    model.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()

    return step, sum(p.numel() for p in parameters)


def timed(step, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (cuda {torch.version.cuda})"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {os.cpu_count()} cores"


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer and shorter steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--length", type=int, default=10, help="K, prompts per layer")
    parser.add_argument("--layers", type=int, default=28, help="L, adapted top layers")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    batch_size = args.batch or (8 if cuda else 2)
    seq = args.seq or (1024 if cuda else (128 if args.quick else 256))
    steps = args.steps or (10 if args.quick else 40)
    warmup = args.warmup or (2 if args.quick else 5)
    dtype = torch.bfloat16 if cuda else torch.float32

    base = build_base(dtype, args.device)
    batch = torch.randint(0, SMOLLM2_135M["vocab_size"], (batch_size, seq), generator=torch.Generator().manual_seed(0))
    batch = batch.to(args.device)
    runs, sizes = {}, {}
    for name, build in VARIANTS.items():
        runs[name], sizes[name] = make_step(build(copy.deepcopy(base), args.length, args.layers), batch)
    del base
    times: dict[str, list[float]] = {name: [] for name in runs}
    for index in range(warmup + steps):
        for name, step in runs.items():  # alternate, so that drifts of the machine hit every variant alike
            elapsed = timed(step, args.device)
            if index >= warmup:
                times[name].append(elapsed)
    medians = {name: statistics.median(values) for name, values in times.items()}

    lines = [
        f"| variant | trainable parameters | median step (ms) | vs floor |",
        f"| --- | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {name} | {sizes[name]:,} | {1000 * medians[name]:.1f} | {medians[name] / medians['floor']:.3f} |"
        for name in runs
    ]
    summary = (
        f"peft_vlm / peft = {medians['peft_vlm'] / medians['peft']:.3f}, "
        f"peft_vlm / floor = {medians['peft_vlm'] / medians['floor']:.3f}"
    )
    setup = (
        f"SmolLM2-135M shape, random weights, {str(dtype).removeprefix('torch.')}, batch {batch_size} x {seq} tokens, "
        f"K={args.length}, L={args.layers}, {steps} steps after {warmup} warm-up, device {args.device}"
    )
    print(setup)
    print("\n".join(lines))
    print(summary)
    if not args.no_record:
        record(setup, lines, summary, args.device)
    return medians


def record(setup: str, lines: list[str], summary: str, device: str) -> None:
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nEntries are appended by the scripts in this folder, newest last.\n")
    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    entry = [
        "",
        f"## bench_adaption_prompt: {datetime.date.today().isoformat()}",
        "",
        f"- command: `{command}`",
        f"- machine: {machine(device)}; torch {torch.__version__}, transformers {__import__('transformers').__version__}, "
        f"peft {peft.__version__}",
        f"- setup: {setup}",
        "",
        *lines,
        "",
        summary,
        "",
    ]
    with RESULTS.open("a") as handle:
        handle.write("\n".join(entry))


if __name__ == "__main__":
    main()
