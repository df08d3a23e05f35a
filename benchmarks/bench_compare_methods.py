"""Method comparison on the embedded default: the same steps on the same easy-VQA data for every method.

    python benchmarks/bench_compare_methods.py [--steps 300] [--slow-steps 100] [--limit 1000] [--only lora,qlora]
                                               [--jobs 2] [--resume]

Each method runs in its own process (so peak memory is its own) through the `llama_adapter_v2_joint` recipe with the
method swapped in: caption and instruction batches in the same order, the same evaluation questions. Prints a table
and appends it to benchmarks/RESULTS.md with the command, the machine and the date.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "llama_adapter_v2_joint.yaml"

# name -> recipe overrides. Every setup trains its own "vision" group on caption batches and its "language" group on
# instruction batches, except where it has a single group (then every batch trains it).
METHODS = {
    "LLaMA-Adapter v1 multimodal": ["methods=[llama-adapter-v1-multimodal]"],
    "LLaMA-Adapter V2 (paper)": ["methods=[llama-adapter-v2]"],
    "LLaMA-Adapter V2 (official code)": ["methods=[llama-adapter-v2-official]"],
    "LLaVA projector + LoRA": ["methods=[lora]"],
    "QLoRA (4-bit base + LoRA)": ["methods=[lora]", "model.load_in_4bit=true"],
    # The expert is the model's only adapter, so it takes the "language" role: instruction batches train it, caption
    # batches train the connector.
    "visual expert, low rank": [
        "methods=[{method: visual_expert, rank: 8, shared_image_position: true, group: language}]"
    ],
    # Flamingo: the resampler is the connector (caption batches), the gated blocks take the language role.
    "Flamingo (resampler + gated xattn)": [
        "model.connector=perceiver_resampler", "methods=[{method: gated_cross_attention, every: 4, group: language}]"
    ],
    # BLIP-2 trains the Q-Former alone with the LM frozen: one group, trained on the instruction batches. Its LM
    # never learns to answer after a description (nothing in it trains), so it answers directly, as in its paper.
    "BLIP-2 Q-Former": [
        "model.connector=qformer", "methods=[]", "data.captions=null", "train.caption_groups=[]",
        "train.instruction_groups=[vision]", "data.instructions.options={balance_yes_no: true}",
        "eval.describe_first=false"
    ],
}

# several times the others' step time on CPU (large trained blocks; Flamingo's 64 latents are also in the sequence)
SLOWEST = ("Flamingo (resampler + gated xattn)", "LLaMA-Adapter V2 (official code)")


def run_one(name: str, overrides: list[str], output: Path) -> dict:
    """Train and evaluate one method in this process; returns its figures."""
    import torch

    from peft_vlm.recipes import load_recipe, run_recipe

    fixed = [f"train.output_dir={output}", "train.checkpoint_every=0", "eval.zero_shot=false",
             "eval.verify_reload=false", "eval.curve=null"]
    recipe = load_recipe(RECIPE, [*overrides, *fixed])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    figures = run_recipe(recipe, log=lambda *_: None)
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    steps = recipe["train"]["max_steps"]
    return {
        "method": name,
        "steps": steps,
        "accuracy": figures["accuracy"].as_dict(),
        "grey_image": figures["grey_image"].as_dict(),
        "trainable_parameters": figures["trainable_parameters"],
        "adapter_bytes": figures["adapter_bytes"],
        "seconds_per_step": figures["train_seconds"] / steps,
        "peak_memory_bytes": peak,
    }


def table(rows: list[dict]) -> str:
    kinds = ["all", "color", "shape", "yes/no"]
    header = ("| method | steps | " + " | ".join(f"acc {k}" for k in kinds)
              + " | grey-image acc (all / color / shape) | trainable | adapter MB | s/step | peak mem GB |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        acc = " | ".join(f"{100 * r['accuracy'].get(k, float('nan')):.1f}" for k in kinds)
        grey = " / ".join(f"{100 * r['grey_image'].get(k, float('nan')):.1f}" for k in ("all", "color", "shape"))
        lines.append(f"| {r['method']} | {r.get('steps', '')} | {acc} | {grey} | {r['trainable_parameters']:,} | "
                     f"{r['adapter_bytes'] / 1e6:.2f} | "
                     f"{r['seconds_per_step']:.2f} | {r['peak_memory_bytes'] / 1e9:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps per method (the main job's)")
    parser.add_argument("--slow-steps", type=int,
                        help=f"training steps for the slowest setups ({', '.join(SLOWEST)}; default: --steps)")
    parser.add_argument("--limit", type=int, default=300,
                        help="evaluation questions (evenly spaced over the test split)")
    parser.add_argument("--only", help="comma-separated subset of method names (substring match)")
    parser.add_argument("--out", default="out/bench_compare_methods")
    parser.add_argument("--jobs", type=int, default=1, help="methods trained at once")
    parser.add_argument("--resume", action="store_true", help="keep the figures of methods an interrupted run finished")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one method in this process
    args = parser.parse_args()
    common = [f"train.max_steps={args.steps}", f"eval.limit={args.limit}", "train.progress_bar=false",
              "train.report_to=null"]

    if args.one:
        result = run_one(args.one, [*METHODS[args.one], *common], Path(args.out) / args.one.replace(" ", "_"))
        print("RESULT " + json.dumps(result))
        return

    chosen = [m for m in METHODS if not args.only or any(s.strip().lower() in m.lower() for s in args.only.split(","))]
    start = time.time()
    # `--jobs N` trains N methods at once, each on cpu_count / N threads (on 2 cores, two one-thread processes get
    # more done than one two-thread process); every row is then measured under the same sharing.
    threads = str(max(1, (os.cpu_count() or 1) // args.jobs))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": threads}

    def measure(name: str) -> dict | None:
        # each method's figures are kept as they finish, so an interrupted comparison continues with --resume
        saved = Path(args.out) / name.replace(" ", "_") / "result.json"
        if args.resume and saved.is_file():
            print(f"{name}: kept from {saved}", flush=True)
            return json.loads(saved.read_text())
        steps = args.slow_steps if args.slow_steps and name in SLOWEST else args.steps
        command = [sys.executable, __file__, "--one", name, "--steps", str(steps), "--limit", str(args.limit),
                   "--out", args.out]
        completed = subprocess.run(command, capture_output=True, text=True, env=env)
        payload = next((line.removeprefix("RESULT ") for line in completed.stdout.splitlines()
                        if line.startswith("RESULT ")), None)
        if payload is None:
            print(f"{name}: failed\n{completed.stderr[-2000:]}", file=sys.stderr, flush=True)
            return None
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(payload)
        print(f"{name}: done ({time.time() - start:.0f} s)", flush=True)
        return json.loads(payload)

    # the slowest setups start first, so that no worker is left alone with one at the end; rows keep METHODS' order
    order = sorted(chosen, key=lambda name: name not in SLOWEST)
    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(zip(order, pool.map(measure, order)))
    rows = [results[name] for name in chosen if results[name] is not None]
    text = table(rows)
    print(text)
    device = ("GPU " + __import__("torch").cuda.get_device_name() if __import__("torch").cuda.is_available()
              else f"CPU ({os.cpu_count()} cores)")
    entry = (
        f"\n## Method comparison on the embedded default ({date.today()})\n\n"
        f"Command: `python benchmarks/bench_compare_methods.py {' '.join(sys.argv[1:])}`  \n"
        f"Machine: {device}, {platform.platform()}, load average {os.getloadavg()[0]:.1f} at the end  \n"
        f"Methods trained {args.jobs} at a time, {threads} thread(s) each.  \n"
        f"{args.steps} steps per method ({args.slow_steps or args.steps} for {', '.join(SLOWEST)}), recipe "
        f"`llama_adapter_v2_joint` with the method swapped in; accuracy on "
        f"{args.limit} evenly spaced easy-VQA test questions (%), with the real image and with a neutral grey "
        f"image.\n\n"
        f"{text}\n"
    )
    with open(Path(__file__).parent / "RESULTS.md", "a") as results:
        results.write(entry)


if __name__ == "__main__":
    main()
