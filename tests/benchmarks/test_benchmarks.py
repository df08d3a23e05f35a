"""The benchmark scripts run end to end in their quick modes on tiny shapes, and write nothing when told not to."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from peft_vlm.training.config import native_bf16

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
    gpu_7b = benchmarks("bench_gpu_7b")
    gpu_7b.main(["--quick", "--shape", "tiny", "--device", "cpu", "--no-record"])  # the GPU script's logic, on CPU
    printed = capsys.readouterr().out
    assert "| peft_vlm LoRA r=8 |" in printed and "| QLoRA r=8, batch 1 x 2048 |" in printed
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            gpu_7b.main(["--no-record"])
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):  # CPU figures are never recorded
            gpu_7b.main(["--quick", "--device", "cpu"])
    assert (results.read_text() if results.exists() else None) == before


def test_cpu_mfu_benchmark_measures_every_lever_against_the_ceiling(benchmarks, vlm_factory, images):
    import peft_vlm as pv

    bench = benchmarks("bench_cpu_mfu")
    models = {}
    for name, attention in (("sdpa", "sdpa"), ("eager", "eager"), ("frozen_bf16", "eager")):
        model = vlm_factory()
        model.language_model.set_attn_implementation(attention)
        models[name] = pv.apply(model, pv.AdaptionPromptConfig(length=4, layers=2), pv.BiasScaleConfig())
    batch = models["sdpa"].tokenize(["<image> what colour?", "<image> what shape is it?"], [images[0], images[1]],
                                    answers=["red", "circle"])
    config = models["sdpa"].language_model.config
    shapes = bench.step_shapes(batch["input_ids"].numel(), 3, config)
    assert shapes["k / v projection"][2] == config.num_key_value_heads * config.hidden_size // 4
    ceiling, shape_rows = bench.ceilings({name: shapes[name] for name in ("q / o projection", "down projection")})
    with bench.frozen_linear_weights_in(models["frozen_bf16"], torch.bfloat16) as cast:
        rows, useful, seconds, steps = bench.measure(models, batch, steps=1, warmup=0, ceiling=ceiling)
        split = bench.step_split(steps["+ bf16 autocast" if native_bf16() else "plain-matmul attention, fp32"], 1)
    variants = 7 if native_bf16() else 3  # the bf16 rows only where the CPU has bf16 kernels
    assert set(ceiling) == ({"fp32", "bf16"} if native_bf16() else {"fp32"}) and len(shape_rows) == 2
    assert cast > 0 and len(rows) == len(seconds) == variants and useful > 0 and all(s > 0 for s in seconds.values())
    assert all(row[-1].endswith("%") for row in rows) and rows[0][3] == "1.00x"
    # the profiled split: the step's matmuls, attention and optimizer are each seen, and the parts add up to its wall
    wall = split.pop("wall")
    assert split["matmuls (projections, LM head)"] > 0 and split["attention"] > 0 and split["optimizer"] > 0
    assert sum(split.values()) >= wall * 0.999
    assert "(" in bench.cpu_kind()


def test_method_comparison_takes_the_minimum_over_seeds_and_draws_every_method(benchmarks, tmp_path):
    bench = benchmarks("bench_compare_methods")

    def run(yes_no, protocol):
        return {"accuracy": {"all": 0.95, "color": 0.99, "shape": 0.97, "yes/no": yes_no},
                "grey_image": {"all": 0.6, "color": 0.12, "shape": 0.33, "yes/no": 0.8}, "steps": 900,
                "train_seconds": 600.0, "trainable_parameters": 5_328_000, "adapter_bytes": 21_000_000,
                "answer_protocol": protocol}

    one_pass = bench.summary("LLaVA", [run(0.97, {"describe_first": False}), run(0.88, {"describe_first": False})])
    two_pass = bench.summary("V2", [run(0.99, {"describe_first": True})])
    failed = bench.summary("Flamingo", [{"error": "exit 1 (see flamingo.log)"}])
    # one seed passed, the other was stopped: no minimum over both seeds, so no pass
    half = bench.summary("BLIP-2", [run(0.99, {"describe_first": False}), {"error": "stopped after 60 minutes"}])
    assert half["seeds"] == 1 and not bench.passes_bar(half)
    assert "| no (1 run(s) failed: stopped after 60 minutes) |" in bench.table([half])
    assert one_pass["accuracy"]["yes/no"] == 0.88 and one_pass["passes"] == 1 and two_pass["passes"] == 2
    assert not bench.passes_bar(one_pass) and bench.passes_bar(two_pass)
    printed = bench.table([one_pass, two_pass, failed])
    assert "| LLaVA | 1 | 900 | 2 | 95.0 | 99.0 | 97.0 | 88.0 |" in printed and "| no |" in printed
    assert "exit 1 (see flamingo.log)" in printed
    assert set(bench.METHODS.values()) <= {str(p.relative_to(BENCHMARKS.parent))
                                           for p in (BENCHMARKS.parent / "recipes").rglob("*.yaml")}
    assert bench.chart([one_pass, two_pass, failed], tmp_path / "chart.png").stat().st_size > 10_000
    # a recorded table reads back as the rows it shows (what --resume carries for a method with no runs on disk)
    results = tmp_path / "RESULTS.md"
    results.write_text(f"## Method comparison (old)\n\n{bench.table([failed])}\n\n## Method comparison (new)\n\n"
                       + bench.table([one_pass, dict(two_pass, carried=True), failed]))
    recorded = bench.recorded_rows(results)
    assert list(recorded) == ["LLaVA", "V2"] and recorded["V2"]["carried"]
    assert recorded["LLaVA"]["accuracy"] == pytest.approx(one_pass["accuracy"])
    assert recorded["LLaVA"]["grey_image"] == pytest.approx(one_pass["grey_image"])
    assert bench.table([recorded["LLaVA"]]).splitlines()[2] == printed.splitlines()[2].replace("LLaVA", "LLaVA *")


def test_packing_benchmark_prints_the_pad_share_each_way_without_recording(benchmarks, capsys):
    results = BENCHMARKS / "RESULTS.md"
    before = results.read_text()
    benchmarks("bench_packing").main(["--quick", "--model", "tiny", "--rows", "8", "--batch-size", "4",
                                      "--no-record"])
    printed = capsys.readouterr().out
    assert "| padded | 4.0 |" in printed and "| packed |" in printed and "pad share" in printed
    assert results.read_text() == before

def test_vision_cache_benchmark_times_the_step_without_and_with_every_image_a_hit(benchmarks, vlm_factory, images,
                                                                                   tmp_path):
    import peft_vlm as pv

    bench = benchmarks("bench_vision_cache")
    model = pv.apply(vlm_factory(), pv.AdaptionPromptConfig(length=4, layers=2), pv.BiasScaleConfig())
    batch = model.tokenize(["<image> what colour?", "<image> what shape is it?"], [images[0], images[1]],
                           answers=["red", "circle"])
    seconds = bench.measure(model, dict(batch), steps=1, warmup=0, bf16=False, folder=tmp_path / "features")
    assert {"without", "with", "tower"} <= set(seconds) and all(seconds[k] > 0 for k in ("without", "with", "tower"))
    assert seconds["hits"] == 2  # the timed step: both images read from the cache the first step filled
    assert model.vision_feature_cache is None and len(list((tmp_path / "features").rglob("*.safetensors"))) == 2


def test_connector_signal_probe_reads_a_linearly_encoded_label_and_the_share_tells_constant_from_varied(benchmarks):
    bench = benchmarks("bench_connector_signal")
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (300,), generator=generator)
    constant = torch.randn(1, 8, 16, generator=generator).expand(300, -1, -1)
    signal = torch.nn.functional.one_hot(labels, 16).float()[:, None, :] * 0.01  # 1% of the output carries it
    assert bench.probe((constant + signal).flatten(1), labels, fit=200) > 0.95
    assert bench.probe(constant.flatten(1) + torch.randn(300, 128, generator=generator), labels, fit=200) < 0.5
    assert bench.image_share(constant) == pytest.approx(0.0, abs=1e-6)
    assert 0 < bench.image_share(constant + signal) < 1e-3
    assert bench.image_share(torch.randn(300, 8, 16, generator=generator)) == pytest.approx(1.0, abs=0.05)


def test_compiled_layers_benchmark_counts_the_compile_against_the_steady_saving(benchmarks):
    def history(first, steady, steps=30, loss=1.0):
        return [{"seconds": first if step == 0 else steady, "loss": loss} for step in range(steps)]

    lines, notes = benchmarks("bench_compiled_layers").compare(history(2.0, 1.0), history(22.0, 0.8, loss=1.25))
    assert lines[2] == "| eager | 2.0 | 1.000 | 31 |" and lines[3] == "| compiled decoder layers | 22.0 | 0.800 | 45 |"
    # beyond its steady step the compiled first step takes 21.2 s, the eager one 1 s; 0.2 s less a step after
    assert notes[0] == "- steady step 1.25x faster than the eager one; compiling costs 20 s, paid back after 101 steps"
    assert notes[1].endswith("2.50e-01")
    assert benchmarks("bench_compiled_layers").compare(history(2.0, 1.0), history(9.0, 1.1))[1][0].endswith("never")
