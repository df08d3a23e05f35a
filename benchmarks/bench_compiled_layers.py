"""The main job's training run with its decoder layers compiled (`train.compile_layers`) against the same run eager.

    python benchmarks/bench_compiled_layers.py [--steps 80] [--threads 2] [--recipe recipes/llama_adapter_v2_joint.yaml]

Each variant trains the recipe's first `--steps` steps in its own process, with an empty inductor cache (the
compile a first run waits for; later runs of the same model read it back from the cache), with the recipe's seed,
data and precision, and records every step's time (`seconds` in the run's history). The table gives the first step
(where the compile happens), the median step after the first ten, the whole run, and the steps after which the
compile has paid for itself; the largest loss difference between the two runs says the compiled run trains the
same. `bench_cpu_mfu.py --compile` measures the same lever on one batch, side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "llama_adapter_v2_joint.yaml"
SETTLED = 10  # steps before the median: the compile, the recompile for a second sequence length, warm caches


def one_run(recipe: Path, steps: int, compiled: bool) -> list[dict]:
    """The history of `steps` steps of the recipe's (first) stage, decoder layers compiled or not."""
    from accelerate.utils import set_seed

    from peft_vlm.recipes import Evaluation, build_model, load_recipe, train_stages

    with tempfile.TemporaryDirectory() as output:
        overrides = [f"train.max_steps={steps}", f"train.output_dir={output}", "train.checkpoint_every=0",
                     "train.report_to=null", "train.progress_bar=false", f"train.compile_layers={compiled}",
                     "eval.curve=null"]
        spec = load_recipe(recipe, overrides)
        set_seed(int(spec["train"].get("seed", 0)))
        model = build_model(spec.get("model") or {})
        _, results = train_stages(model, spec, Evaluation(spec), log=lambda *_: None)
        return results[-1].history


def summary(history: list[dict]) -> dict[str, float]:
    seconds = [h["seconds"] for h in history]
    return {"first": seconds[0], "median": statistics.median(seconds[SETTLED:]), "total": sum(seconds)}


def compare(eager_history: list[dict], compiled_history: list[dict]) -> tuple[list[str], list[str]]:
    """The table's lines and the notes: steady speed-up, what compiling cost, when it has paid for itself."""
    steps = len(eager_history)
    eager, compiled = summary(eager_history), summary(compiled_history)
    saving = eager["median"] - compiled["median"]
    # what the compiled run spent beyond its steady steps (the compile, the recompile for a second length), less
    # the same for the eager run (its warm-up)
    overhead = (compiled["total"] - steps * compiled["median"]) - (eager["total"] - steps * eager["median"])
    paid = f"after {max(0.0, overhead) / saving:.0f} steps" if saving > 0 else "never"
    rows = [[name, f"{s['first']:.1f}", f"{s['median']:.3f}", f"{s['total']:.0f}"]
            for name, s in (("eager", eager), ("compiled decoder layers", compiled))]
    lines = common.table(["variant", "first step (s)", f"median step after {SETTLED} (s)", f"{steps} steps (s)"],
                         rows)
    loss_gap = max(abs(a["loss"] - b["loss"]) for a, b in zip(eager_history, compiled_history))
    notes = [f"- steady step {eager['median'] / compiled['median']:.2f}x faster than the eager one; compiling "
             f"costs {overhead:.0f} s, paid back {paid}",
             f"- largest loss difference between the runs over the {steps} steps: {loss_gap:.2e}"]
    return lines, notes


def main(argv=None) -> None:
    parser = common.parser(__doc__.split("\n", 1)[0], steps=80, warmup=0)
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--one", choices=["eager", "compiled"], help=argparse.SUPPRESS)
    parser.set_defaults(threads=2)
    args = common.parse(parser, argv)
    if args.one:  # the child process: one variant, its history as JSON on stdout's last line
        print(json.dumps(one_run(args.recipe, args.steps, args.one == "compiled")))
        return
    start_load = common.load_average()
    histories = {}
    for variant in ("eager", "compiled"):
        command = [sys.executable, __file__, "--one", variant, "--steps", str(args.steps), "--recipe",
                   str(args.recipe), "--threads", str(args.threads)]
        with tempfile.TemporaryDirectory() as cache:  # an empty inductor cache: the compile a first run waits for
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            output = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT, env=env).stdout
        histories[variant] = json.loads(output.strip().splitlines()[-1])
    lines, notes = compare(histories["eager"], histories["compiled"])
    notes.append(f"- load average {start_load} at the start, {common.load_average()} at the end")
    common.report("bench_compiled_layers", f"{args.recipe.relative_to(ROOT)}, {args.steps} steps per variant, "
                  f"{args.threads} threads, each variant in its own process", lines, notes, args.device,
                  not args.no_record)


if __name__ == "__main__":
    main()
