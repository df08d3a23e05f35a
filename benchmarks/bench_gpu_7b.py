"""LLaMA-7B shape, random bf16 weights, one GPU: training tokens/s, peak memory and model FLOPs utilisation (MFU) of
adaption prompts and LoRA (ours and peft's) against the floor, and the peak memory of a QLoRA step.

MFU = achieved FLOP/s / ceiling. A frozen-base PEFT step costs about 4 x P x tokens FLOPs (forward 2, input
gradients 2; no weight gradients of the base), P = the parameters that take part in matmuls (all but the input
embeddings); attention's own FLOPs are not counted, so the figure is conservative. The ceiling is the bf16 matmul
rate this script measures on the same GPU in the same run (8192^3 matmuls), not a datasheet number. The floor is the
frozen model with one trainable scale at the lowest adapted layer's input (`common.add_floor_scale`). All variants
share one copy of the frozen weights and alternate step by step; figures are medians after warm-up.

QLoRA: the decoder's linear layers quantized to 4-bit NF4 (bitsandbytes), LoRA r=8 on every projection, gradient
checkpointing, batch 1; its peak allocated memory is compared with the QLoRA paper's and LLaMA-Factory's ~6 GB.

    python benchmarks/bench_gpu_7b.py             # needs a CUDA GPU (about 45 GB free at the defaults)
    python benchmarks/bench_gpu_7b.py --quick     # SmolLM2 shape, few steps: checks the script on any GPU
    python benchmarks/bench_gpu_7b.py --quick --shape tiny --device cpu --no-record  # checks its logic on CPU (the test
                                            # suite does); CPU figures say nothing about a GPU and are never recorded
"""
from __future__ import annotations

import gc
import sys

import peft
import torch

import peft_vlm as pv
import common  # this folder is on sys.path when a script here runs

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOP_LAYERS = 30  # LLaMA-Adapter's L on the 32-layer 7B model


def matmul_ceiling(device: str, size: int = 8192, repeats: int = 20) -> float:
    """Measured bf16 matmul FLOP/s (median of `repeats` after warm-up)."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    runs = {"matmul": lambda: torch.mm(a, b)}
    seconds = common.side_by_side(runs, repeats, 5, device)["matmul"]
    return 2 * size**3 / seconds


def variants(base) -> dict:
    top = min(TOP_LAYERS, base.config.num_hidden_layers)
    lora = lambda: peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=PROJECTIONS)  # noqa: E731
    return {
        "floor (top L)": lambda m: common.add_floor_scale(m, m.config.num_hidden_layers - top),
        "peft_vlm adaption prompt": lambda m: common.open_gates(
            pv.apply(m, pv.AdaptionPromptConfig(length=10, layers=top))),
        "peft AdaptionPrompt": lambda m: common.open_gates(peft.get_peft_model(m, peft.AdaptionPromptConfig(
            adapter_len=10, adapter_layers=top, task_type="CAUSAL_LM"))),
        "floor (all layers)": lambda m: common.add_floor_scale(m, 0),
        "peft_vlm LoRA r=8": lambda m: pv.apply(m, lora()),
        "peft LoRA r=8": lambda m: peft.get_peft_model(m, lora()),
    }


def training(args, ceiling: float) -> tuple[list[str], list[str]]:
    base = common.build_base(args.shape, torch.bfloat16, args.device)
    matmul_parameters = sum(p.numel() for p in base.parameters()) - base.get_input_embeddings().weight.numel()
    if base.get_output_embeddings().weight is base.get_input_embeddings().weight:
        matmul_parameters += base.get_input_embeddings().weight.numel()  # tied: the head is still a matmul
    batch = common.random_batch(base.config.vocab_size, args.batch, args.seq, args.device)
    models = {name: build(common.shared_copy(base)) for name, build in variants(base).items()}
    runs = {name: common.make_step(model, batch) for name, model in models.items()}
    load_before = common.load_average()
    medians = common.side_by_side(runs, args.steps, args.warmup, args.device)
    memory = {name: common.step_memory(step, models[name], args.device) for name, step in runs.items()}
    tokens = args.batch * args.seq
    rows = []
    for name in runs:
        floor = "floor (top L)" if "daption" in name else "floor (all layers)"
        mfu = 4 * matmul_parameters * tokens / medians[name] / ceiling
        rows.append([name, f"{1000 * medians[name]:.1f}", f"{tokens / medians[name]:,.0f}", f"{100 * mfu:.1f}%",
                     f"{medians[name] / medians[floor]:.3f}", f"{memory[name][1] / 2**30:.2f}"])
    notes = [
        f"- bf16 matmul ceiling measured in this run: {ceiling / 1e12:.0f} TFLOP/s; P = {matmul_parameters / 1e9:.2f}B "
        f"matmul parameters; MFU = 4 P tokens / step time / ceiling",
        f"- peft_vlm adaption prompt / peft AdaptionPrompt = "
        f"{medians['peft_vlm adaption prompt'] / medians['peft AdaptionPrompt']:.3f}; "
        f"peft_vlm LoRA / peft LoRA = {medians['peft_vlm LoRA r=8'] / medians['peft LoRA r=8']:.3f}",
        f"- load average {load_before}",
    ]
    memory_kind = next(iter(memory.values()))[0]
    lines = common.table(["variant", "step (ms)", "tokens/s", "MFU", "vs floor", f"{memory_kind} (GiB)"], rows)
    del models, runs, base
    return lines, notes


def quantized_4bit(model):
    """Replace every linear layer of the decoder with a bitsandbytes NF4 layer holding the same weights."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for owner in (layer.self_attn, layer.mlp):
            for name, child in list(owner.named_children()):
                if isinstance(child, torch.nn.Linear):
                    quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                                  compute_dtype=torch.bfloat16, quant_type="nf4", device="meta")
                    quantized.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
                    quantized.bias = child.bias
                    setattr(owner, name, quantized.to(child.weight.device))  # quantizes; the bf16 weight is freed
    model.is_loaded_in_4bit = True  # what peft reads to pick its 4-bit LoRA layers
    return model


def qlora(args) -> tuple[list[str], list[str]]:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        return [], [f"- QLoRA: not measured (bitsandbytes does not import: {error})"]
    model = quantized_4bit(common.build_base(args.shape, torch.bfloat16, args.device))
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    pv.apply(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=PROJECTIONS))
    rows = []
    for seq in (512, 2048):
        batch = common.random_batch(model.config.vocab_size, 1, seq, args.device)
        step = common.make_step(model, batch)
        step()  # warm-up: optimizer state exists from here on, as in training
        release_memory(args.device)
        memory_kind, memory = common.step_memory(step, model, args.device)
        rows.append([f"QLoRA r=8, batch 1 x {seq}", f"{memory / 2**30:.2f}"])
    notes = ["- QLoRA: reference ~6 GB for 7B (QLoRA paper, LLaMA-Factory's hardware table)"]
    if args.device == "cuda":
        notes[0] += f"; memory allocated between steps {torch.cuda.memory_allocated() / 2**30:.2f} GiB"
    return common.table(["QLoRA", f"{memory_kind} (GiB)"], rows), notes


def release_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def main(argv=None) -> None:
    parser = common.parser(__doc__.split("\n")[0], steps=15, warmup=3)
    parser.set_defaults(shape="llama-7b")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    args = common.parse(parser, argv)
    cpu_check = args.device == "cpu" and args.quick and args.no_record
    if not (args.device == "cuda" and torch.cuda.is_available()) and not cpu_check:
        sys.exit("bench_gpu_7b.py needs a CUDA GPU and none is available here: GPU figures stay 'not measured'. "
                 "(`--quick --shape tiny --device cpu --no-record` checks the script's logic on CPU.)")
    if args.quick:
        args.steps, args.warmup = 3, 1
        args.shape = "smollm2-135m" if args.shape == "llama-7b" else args.shape
        args.seq = min(args.seq, 512 if args.device == "cuda" else 32)
    ceiling = matmul_ceiling(args.device, size=8192 if args.device == "cuda" else 256)
    lines, notes = training(args, ceiling)
    release_memory(args.device)
    qlora_lines, qlora_notes = qlora(args)
    setup = (f"{args.shape} shape, random bf16 weights, batch {args.batch} x {args.seq} tokens, AdamW, median of "
             f"{args.steps} alternating steps after {args.warmup} warm-up, SDPA, "
             "no gradient checkpointing (QLoRA: with)")
    common.report("bench_gpu_7b", setup, [*lines, "", *qlora_lines], [*notes, *qlora_notes], args.device,
                  not args.no_record)


if __name__ == "__main__":
    main()
