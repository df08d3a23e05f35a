"""The benchmark scripts run end to end in their quick modes on tiny shapes, and write nothing when told not to."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
QUICK_RUNS = {
    "bench_training_step": ["--quick", "--shape", "tiny", "--seq", "32", "--steps", "1", "--warmup", "0"],
    "bench_adaption_prompt": ["--quick", "--shape", "tiny", "--seq", "32"],
    "bench_scaling": ["--quick", "--shape", "tiny"],
    "bench_inference": ["--quick", "--shape", "tiny"],
    "bench_adapter_size": ["--shape", "tiny"],
}


@pytest.fixture
def benchmarks(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    threads = torch.get_num_threads()
    yield lambda name: importlib.import_module(name)
    torch.set_num_threads(threads)  # the scripts pin CPU threads


def test_every_cpu_benchmark_runs_quickly_without_recording(benchmarks, capsys):
    results = BENCHMARKS / "RESULTS.md"
    before = results.read_text() if results.exists() else None
    for name, options in QUICK_RUNS.items():
        benchmarks(name).main([*options, "--no-record"])
        assert "| --- |" in capsys.readouterr().out, f"{name} printed no table"
    gpu_7b = benchmarks("gpu_7b")
    gpu_7b.main(["--quick", "--shape", "tiny", "--device", "cpu", "--no-record"])  # the GPU script's logic, on CPU
    printed = capsys.readouterr().out
    assert "| peft_vlm LoRA r=8 |" in printed and "| QLoRA r=8, batch 1 x 2048 |" in printed
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            gpu_7b.main(["--no-record"])
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):  # CPU figures are never recorded
            gpu_7b.main(["--quick", "--device", "cpu"])
    assert (results.read_text() if results.exists() else None) == before
