"""What every benchmark here shares: model shapes, the floor, side-by-side timing, memory figures, RESULTS.md entries.

Timings on a shared machine drift with its load, so variants are never timed one after the other: `side_by_side`
runs one step of each variant in turn (the order rotating every round) and keeps the median of each after warm-up.
Every entry records the load average at the start and the end of its measurement, so a noisy run can be told apart.
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
from typing import Callable

import peft
import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig

SHAPES = {
    # SmolLM2-135M: small enough for any CPU, LLaMA-class (GQA, RMSNorm, SwiGLU, tied embeddings).
    "smollm2-135m": dict(
        hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
        vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True,
    ),
    "llama-7b": dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, intermediate_size=11008,
        vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False,
    ),
    # For smoke tests of the scripts themselves: seconds, no meaning as a measurement.
    "tiny": dict(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=320, max_position_embeddings=2048, tie_word_embeddings=False,
    ),
}
RESULTS = Path(__file__).with_name("RESULTS.md")


def build_base(shape: str, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0):
    """A LLaMA-class causal LM of the named shape with random weights, SDPA attention, frozen."""
    torch.manual_seed(seed)
    config = LlamaConfig(**SHAPES[shape])
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = None  # random weights: generate exactly the tokens asked for
    return model.requires_grad_(False)


def shared_copy(model):
    """A copy of `model` that shares its frozen weights and buffers (training variants side by side in the memory
    of one model); never merge into such a copy: merging writes the shared weights."""
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo=shared)


def add_floor_scale(model, layer_index: int):
    """The floor of a frozen-base method whose lowest adapted layer is `layer_index`: the same frozen model with one
    trainable scale multiplying that layer's input. Its backward pass runs through the same layers as any adapter
    there, so no method on those layers can train faster."""
    model.requires_grad_(False)
    layer = model.model.layers[layer_index]
    layer.floor_scale = torch.nn.Parameter(torch.ones((), device=model.device, dtype=model.dtype))

    def scale_input(module, args, kwargs):
        if args:
            return (args[0] * module.floor_scale, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * module.floor_scale}

    layer.register_forward_pre_hook(scale_input, with_kwargs=True)
    return model


def open_gates(model, suffixes: tuple[str, ...] = ("adaption_prompt.gate", "adaption_gate", "early_fusion.gate")):
    """Zero-init gates make a method a no-op at start; open them so that it takes part in the step as in training."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(suffixes):
                parameter.fill_(0.1)
    return model


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_step(model, batch: torch.Tensor, around: Callable | None = None) -> Callable[[], None]:
    """One AdamW training step on `batch` (labels = inputs). `around(model)` gives a context for the forward pass
    (e.g. `pv.token_types`)."""
    optimizer = torch.optim.AdamW(trainable(model), lr=1e-4)
    model.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        if around is None:
            loss = model(input_ids=batch, labels=batch).loss
        else:
            with around(model):
                loss = model(input_ids=batch, labels=batch).loss
        if loss.requires_grad:  # a batch that reaches no trainable tensor (an expert without image tokens) ends here
            loss.backward()
            optimizer.step()

    return step


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(function: Callable[[], object], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    function()
    sync(device)
    return time.perf_counter() - start


def side_by_side(runs: dict[str, Callable[[], object]], steps: int, warmup: int, device: str) -> dict[str, float]:
    """Median seconds per call of each run, the runs alternating call by call (order rotating each round)."""
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(warmup + steps):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            elapsed = timed(runs[name], device)
            if index >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(values) for name, values in times.items()}


def step_memory(step: Callable[[], None], model, device: str) -> tuple[str, int]:
    """(what, bytes) of one step: on CUDA the peak allocated memory; on CPU, where no allocator keeps a peak, the
    bytes saved for backward (the activations a step holds at its peak), counted once per storage, weights excluded."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return "peak allocated", torch.cuda.max_memory_allocated()
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return "saved for backward", sum(storages.values())


def load_average() -> str:
    return "/".join(f"{value:.1f}" for value in os.getloadavg())


def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (cuda {torch.version.cuda})"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {os.cpu_count()} cores"


def parser(description: str, steps: int, warmup: int) -> argparse.ArgumentParser:
    """The options every timing script has; `--quick` cuts steps, `--shape tiny` makes it a smoke test."""
    result = argparse.ArgumentParser(description=description)
    result.add_argument("--quick", action="store_true", help="fewer and shorter steps")
    result.add_argument("--shape", default="smollm2-135m", choices=list(SHAPES))
    result.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    result.add_argument("--steps", type=int, default=steps, help="timed steps per variant (median)")
    result.add_argument("--warmup", type=int, default=warmup)
    result.add_argument("--threads", type=int, default=1,
                        help="CPU threads; 1 by default: on a loaded machine a second thread waits at every "
                             "OpenMP barrier for a descheduled peer (seen: a step 4x slower with 2 threads than 1)")
    result.add_argument("--no-record", action="store_true", help="print only; do not append to benchmarks/RESULTS.md")
    return result


def parse(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    return args


def dtype_for(device: str) -> torch.dtype:
    return torch.bfloat16 if device == "cuda" else torch.float32


def random_batch(vocab: int, rows: int, length: int, device: str) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(0)).to(device)


def table(header: list[str], rows: list[list[object]]) -> list[str]:
    """Markdown table lines; the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def report(name: str, setup: str, lines: list[str], notes: list[str], device: str, record: bool) -> None:
    """Print the table and, unless told not to, append it to RESULTS.md with the command, machine and date."""
    print(setup, *lines, *notes, sep="\n")
    if not record:
        return
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nEntries are appended by the scripts in this folder, newest last.\n")
    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    entry = [
        "", f"## {name}: {datetime.datetime.now().isoformat(timespec='minutes')}", "",
        f"- command: `{command}`",
        f"- machine: {machine(device)}; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}",
        f"- setup: {setup}", "", *lines, "", *notes, "",
    ]
    with RESULTS.open("a") as handle:
        handle.write("\n".join(entry))
