"""Adapter file size per method: on the LLaMA-7B shape from configs alone, and real files on the SmolLM2 shape.

The 7B model is built on the meta device (no memory, no weights), so its figures are counted, not written: a file is
its tensors (parameters x 4 bytes in fp32) plus the safetensors header, which is computed exactly from the tensor
names, shapes and the adapter's metadata. On the SmolLM2-135M shape the same count is checked against real files
written by `pv.save_adapter`. The paper's figure for LLaMA-Adapter (v1: K=10 prompts on L=30 layers of LLaMA-7B) is
1.2M parameters, 4.7 MB in fp32.

    python benchmarks/bench_adapter_size.py
    python benchmarks/bench_adapter_size.py --shape tiny --no-record    # smoke test
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import peft
import torch

import peft_vlm as pv
from peft_vlm.methods.adapter_file import adapter_metadata
from peft_vlm.runtime.tracking import named_tracked_parameters
import common  # this folder is on sys.path when a script here runs

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = {
    "LLaMA-Adapter v1 (K=10, L=30)": lambda: pv.AdaptionPromptConfig(length=10, layers=30),
    "LoRA r=8 (q, v)": lambda: peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]),
    "LoRA r=8 (all projections)": lambda: peft.LoraConfig(r=8, target_modules=ALL_PROJECTIONS),
    "bias/scale (all linear + norms)": lambda: pv.BiasScaleConfig(),
    "visual expert r=8": lambda: pv.VisualExpertConfig(rank=8),
    "visual expert full": lambda: pv.VisualExpertConfig(),
}
PAPER = {"LLaMA-Adapter v1 (K=10, L=30)": (1.2e6, 4.7)}  # arXiv 2303.16199: 1.2M parameters, 4.7 MB (MiB)


def counted_size(model) -> tuple[int, int]:
    """(parameters, bytes of the adapter file) from names, shapes and metadata: safetensors' 8-byte length, its JSON
    header padded to 8 bytes, then the fp32 tensors."""
    tensors = {name: p for name, (p, _, _) in named_tracked_parameters(model).items()}
    header, offset = {"__metadata__": adapter_metadata(model)}, 0
    for name, parameter in tensors.items():
        size = parameter.numel() * 4
        header[name] = {"dtype": "F32", "shape": list(parameter.shape), "data_offsets": [offset, offset + size]}
        offset += size
    header_bytes = len(json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode())
    return sum(p.numel() for p in tensors.values()), 8 + -(-header_bytes // 8) * 8 + offset


def written_size(model) -> int:
    with tempfile.TemporaryDirectory() as folder:
        return pv.save_adapter(model, Path(folder) / "adapter.safetensors").stat().st_size


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="smollm2-135m", choices=["smollm2-135m", "tiny"],
                        help="the shape whose real files are written (the 7B shape is always counted)")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    rows = []
    small = common.build_base(args.shape)
    for name, config in METHODS.items():
        big_parameters, big_bytes = counted_size(pv.apply(common.build_base("llama-7b", device="meta"), config()))
        real = pv.apply(copy.deepcopy(small), config())
        small_parameters, small_counted = counted_size(real)
        small_written = written_size(real)
        paper = PAPER.get(name)
        rows.append([
            name, f"{big_parameters:,}", f"{big_bytes / 2**20:.2f}",
            f"{paper[0] / 1e6:.1f}M, {paper[1]} MB" if paper else "-",
            f"{small_parameters:,}", f"{small_written / 2**20:.3f}", f"{small_written / small_counted:.4f}",
        ])
    lines = common.table(["method", "7B: parameters", "7B: file (MiB, counted)", "paper (7B)",
                          f"{args.shape}: parameters", f"{args.shape}: file (MiB, written)", "written / counted"], rows)
    setup = ("LLaMA-7B shape on the meta device (fp32 file = parameters x 4 B + safetensors header); real files "
             f"written by pv.save_adapter on the {args.shape} shape with random weights; MiB = 2^20 bytes (the "
             "paper's 4.7 MB for 1.2M fp32 parameters is in these units)")
    common.report("bench_adapter_size", setup, lines, [], "cpu", not args.no_record)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
