"""Method comparison on the embedded default: every method trained on easy-VQA the way its paper trains it.

    python benchmarks/bench_compare_methods.py [--only llava,expert] [--seeds 0,1] [--limit 2000] [--jobs 2]
                                               [--resume] [--max-minutes 30]

Each method has its own recipe (`recipes/easy_vqa/`, the main job for LLaMA-Adapter V2): which streams train which
parameter group, the schedule, and the answer protocol, one pass from the image where the paper answers in one pass,
describe-then-answer for V2 (its expert-context section). Each (method, seed) runs `peft-vlm train` in its own
process and leaves its `metrics.json`. The table gives, per method, the minimum over seeds of each accuracy (2,000
evenly spaced test questions), the grey-image figures beside it, steps, training time, trainable parameters, adapter
size and the number of passes; `benchmarks/figures/compare_methods.png` draws the same as grouped bars. The table is
appended to benchmarks/RESULTS.md with the command, the machine and the date. With `--resume`, runs whose
`metrics.json` is on disk are read back, and a method with none of its runs on disk keeps its row of the newest
recorded table (marked `*`), so one method can be measured again without training the others.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("all", "color", "shape", "yes/no")
FIGURE = Path(__file__).parent / "figures" / "compare_methods.png"
RESULTS = Path(__file__).parent / "RESULTS.md"

# name -> recipe, each as its paper trains and answers
METHODS = {
    "LLaMA-Adapter V2 (main job)": "recipes/llama_adapter_v2_joint.yaml",
    "LLaMA-Adapter V2 (paper layout)": "recipes/easy_vqa/llama_adapter_v2.yaml",
    "LLaMA-Adapter V2 (official code)": "recipes/easy_vqa/llama_adapter_v2_official.yaml",
    "LLaVA projector + LoRA": "recipes/easy_vqa/llava_lora.yaml",
    "QLoRA (4-bit base + LoRA)": "recipes/easy_vqa/qlora.yaml",
    "QLoRA, one pass (4-bit base + projector + LoRA)": "recipes/easy_vqa/qlora_one_pass.yaml",
    "CogVLM visual expert + LoRA": "recipes/easy_vqa/cogvlm_expert.yaml",
    "LLaMA-Adapter v1 multimodal": "recipes/easy_vqa/llama_adapter_v1.yaml",
    "Flamingo (resampler + gated xattn)": "recipes/easy_vqa/flamingo.yaml",
    "BLIP-2 Q-Former": "recipes/easy_vqa/blip2_qformer.yaml",
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def train_one(recipe: str, output: Path, seed: int, limit: int, threads: int, max_minutes: float | None) -> dict:
    """`peft-vlm train RECIPE` in its own process; its metrics.json (or the reason it has none)."""
    overrides = [f"train.output_dir={output}", f"train.seed={seed}", f"eval.limit={limit}", "eval.zero_shot=false",
                 "train.progress_bar=false", "train.report_to=null"]
    command = [sys.executable, "-m", "peft_vlm.cli", "train", str(ROOT / recipe),
               *[item for override in overrides for item in ("--set", override)]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    log = output.parent / f"{output.name}.log"
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        try:
            completed = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                       timeout=max_minutes * 60 * 2 if max_minutes else None)
        except subprocess.TimeoutExpired:
            return {"error": f"stopped after {2 * max_minutes:.0f} minutes (see {log})"}
    metrics = output / "metrics.json"
    if completed.returncode or not metrics.is_file():
        return {"error": f"exit {completed.returncode} (see {log})"}
    return json.loads(metrics.read_text())


def summary(name: str, runs: list[dict]) -> dict:
    """Per method: the minimum over seeds of each real-image accuracy, the median of the grey-image ones."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return {"method": name, "error": "; ".join(r["error"] for r in runs)}
    protocol = good[0].get("answer_protocol") or {}
    return {
        "method": name,
        "seeds": len(good),
        "steps": good[0]["steps"],
        "passes": 2 if protocol.get("describe_first") else 1,
        "accuracy": {k: min(r["accuracy"].get(k, float("nan")) for r in good) for k in KINDS},
        "accuracy_max": {k: max(r["accuracy"].get(k, float("nan")) for r in good) for k in KINDS},
        "grey_image": {k: statistics.median(r["grey_image"].get(k, float("nan")) for r in good) for k in KINDS},
        "train_minutes": max(r["train_seconds"] for r in good) / 60,
        "trainable_parameters": good[0]["trainable_parameters"],
        "adapter_bytes": good[0]["adapter_bytes"],
        "failed_runs": [r["error"] for r in runs if "error" in r],
    }


def passes_bar(row: dict) -> bool:
    """>= 90% on every type (min over seeds), colour and shape >= 20 points over the grey image, and no seed's run
    failed (a minimum over the seeds that finished is no minimum over the seeds asked for)."""
    acc, grey = row["accuracy"], row["grey_image"]
    return (not row.get("failed_runs") and all(acc[k] >= 0.9 for k in KINDS)
            and all(acc[k] - grey[k] >= 0.2 for k in ("color", "shape")))


def table(rows: list[dict]) -> str:
    header = ("| method | passes | steps | seeds | " + " | ".join(f"{k} (min)" for k in KINDS)
              + " | grey: " + " / ".join(KINDS) + " | >= 90% every type | training min | trainable | adapter MB |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | | | 0 | " + " | ".join("-" for _ in KINDS) + f" | {r['error']} | | | | |")
            continue
        acc = " | ".join(f"{100 * r['accuracy'][k]:.1f}" for k in KINDS)
        grey = " / ".join(f"{100 * r['grey_image'][k]:.1f}" for k in KINDS)
        name = r["method"] + (" *" if r.get("carried") else "")
        lines.append(f"| {name} | {r['passes']} | {r['steps']} | {r['seeds']} | {acc} | {grey} | "
                     f"{verdict(r)} | {r['train_minutes']:.1f} | "
                     f"{r['trainable_parameters']:,} | {r['adapter_bytes'] / 1e6:.2f} |")
    return "\n".join(lines)


def verdict(row: dict) -> str:
    failed = row.get("failed_runs") or []
    return ("yes" if passes_bar(row) else "no") + (f" ({len(failed)} run(s) failed: {'; '.join(failed)})"
                                                   if failed else "")


def recorded_rows(results: Path = RESULTS) -> dict[str, dict]:
    """The rows of the newest method-comparison table in RESULTS.md, by method, as `summary` gives them (`carried`
    marks them): what `--resume` shows for a method none of whose runs is on disk."""
    text = results.read_text() if results.is_file() else ""
    section = text.rsplit("## Method comparison", 1)[-1] if "## Method comparison" in text else ""
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 13 or not cells[1].isdigit():
            continue
        name, passes, steps, seeds, *accuracy = cells[:8]
        name = name.removesuffix(" *")
        grey = [float(value) / 100 for value in cells[8].split(" / ")]
        rows[name] = {
            "method": name, "seeds": int(seeds), "steps": int(steps), "passes": int(passes), "carried": True,
            "accuracy": {k: float(v) / 100 for k, v in zip(KINDS, accuracy)}, "grey_image": dict(zip(KINDS, grey)),
            "train_minutes": float(cells[10]), "trainable_parameters": int(cells[11].replace(",", "")),
            "adapter_bytes": float(cells[12]) * 1e6,
        }
    return rows


def chart(rows: list[dict], path: Path = FIGURE) -> Path:
    """Grouped bars: per method, overall / colour / shape / yes-no with the real image (min over seeds) and, hatched
    and paler beside them, with a grey image; the 90% bar as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "error" not in r]
    colours = ("#4c72b0", "#dd8452", "#55a868", "#c44e52")
    width = 0.1
    figure, axes = plt.subplots(figsize=(max(8, 1.6 * len(rows)), 4.8))
    for index, kind in enumerate(KINDS):
        offsets = [m + (index - 3.5) * width for m in range(len(rows))]
        axes.bar(offsets, [100 * r["accuracy"][kind] for r in rows], width, color=colours[index],
                 label=f"{kind}, real image")
        axes.bar([o + 4 * width for o in offsets], [100 * r["grey_image"][kind] for r in rows], width,
                 color=colours[index], alpha=0.35, hatch="//", label=f"{kind}, grey image")
    axes.axhline(90, color="black", linewidth=0.8, linestyle="--")
    axes.set_xticks(range(len(rows)))
    axes.set_xticklabels([textwrap.fill(r["method"], 18) + f"\n({r['passes']} pass{'es' if r['passes'] > 1 else ''}, "
                          f"{r['steps']} steps)" for r in rows], fontsize=7)
    axes.set_ylabel("accuracy (%), min over seeds")
    axes.set_ylim(0, 105)
    axes.set_title("easy-VQA, 2,000 test questions: real image (solid) and grey image (hatched)", fontsize=9)
    axes.legend(fontsize=6, ncol=4, loc="lower left")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated subset of method names (substring match)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated training seeds")
    parser.add_argument("--limit", type=int, default=2000, help="evaluation questions (evenly spaced, test split)")
    parser.add_argument("--out", default="out/bench_compare_methods")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (each on cpu_count / jobs threads)")
    parser.add_argument("--resume", action="store_true", help="keep the metrics of runs that finished before (a "
                                                                 "method with none on disk keeps its recorded row)")
    parser.add_argument("--max-minutes", type=float, default=30,
                        help="training budget per run; a run is stopped at twice this (training and evaluation)")
    parser.add_argument("--no-record", action="store_true", help="print the table; write neither RESULTS.md nor "
                                                                  "the figure")
    args = parser.parse_args(argv)
    chosen = [m for m in METHODS if not args.only or any(s.strip().lower() in m.lower() for s in args.only.split(","))]
    seeds = [int(s) for s in args.seeds.split(",")]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    start = time.time()

    def measure(job: tuple[str, int]) -> dict:
        name, seed = job
        output = Path(args.out) / slug(name) / f"seed-{seed}"
        if args.resume and (output / "metrics.json").is_file():
            return json.loads((output / "metrics.json").read_text())
        result = train_one(METHODS[name], output, seed, args.limit, threads, args.max_minutes)
        print(f"{name}, seed {seed}: {result.get('error', 'done')} ({time.time() - start:.0f} s)", flush=True)
        return result

    # with --resume, a method none of whose runs is on disk keeps the figures of the newest recorded table
    carried = {name: row for name, row in recorded_rows().items() if name in chosen and args.resume and not any(
        (Path(args.out) / slug(name) / f"seed-{seed}" / "metrics.json").is_file() for seed in seeds)}
    jobs = [(name, seed) for name in chosen if name not in carried for seed in seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(zip(jobs, pool.map(measure, jobs)))
    rows = [carried.get(name) or summary(name, [results[(name, seed)] for seed in seeds]) for name in chosen]
    text = table(rows)
    if carried:
        text += ("\n\n\\* not trained in this run: the figures of the previous entry (`--resume` found none of "
                 "its runs on disk)")
    print(text)
    if args.no_record:
        return
    print(f"figure: {chart(rows)}")
    entry = (
        f"\n## Method comparison, each method as its paper trains it ({date.today()})\n\n"
        f"Command: `python benchmarks/bench_compare_methods.py {' '.join(sys.argv[1:] if argv is None else argv)}`  \n"
        f"Machine: CPU ({os.cpu_count()} cores), {platform.platform()}, {args.jobs} run(s) at a time, {threads} "
        f"thread(s) each.  \n"
        f"Recipes in `recipes/easy_vqa/` (V2's main job: `recipes/llama_adapter_v2_joint.yaml`), seeds {args.seeds}; "
        f"accuracy on {args.limit} evenly spaced easy-VQA test questions (%), the minimum over seeds, and the median "
        f"with a neutral grey image; picture: `benchmarks/figures/compare_methods.png`.\n\n{text}\n"
    )
    with open(RESULTS, "a") as results_file:
        results_file.write(entry)


if __name__ == "__main__":
    main()
