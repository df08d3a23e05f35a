"""Padding before and after packing (`train.packing: true`) on LLaVA-format data, and the training step either way.

A LLaVA-format file of mixed conversations is written (an image or none, one to three turns, answers of one word to
a few sentences, the mix of an instruction-tuning set), read back with the LLaVA reader and encoded for the model.
Its rows are collated at the recipe's batch size (`recipes/llava_lora.yaml`, `train.batch_size`) once left-padded
and once packed; the table gives the share of computed positions that are padding, and the rows per batch. Then
one LoRA training step (r=8 on q_proj and v_proj, AdamW) on the first batch each way, side by side: same examples,
same tokens, fewer rows.

    PYTHONPATH=. python benchmarks/bench_packing.py         # the embedded default (SmolLM2-135M + its tower)
    PYTHONPATH=. python benchmarks/bench_packing.py --model tiny  # tiny random LLaMA, embedded tokenizer/tower
    PYTHONPATH=. python benchmarks/bench_packing.py --quick --model tiny --no-record   # smoke test
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import tempfile
from pathlib import Path

import peft
import torch
import yaml
from PIL import Image

import common  # this folder is on sys.path when a script here runs
import peft_vlm as pv
from peft_vlm.data import Collator, SampleDataset, SampleEncoder, read_dataset

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "llava_lora.yaml"
WORDS = ("the red circle is next to a blue square on a gray background and a green triangle sits below it while "
         "a yellow shape is far to the right").split()
QUESTIONS = ["What is in the picture?", "Describe the image in detail.", "What colour is the shape?",
             "Is there a triangle?", "How many shapes are there?", "What is the capital of France?"]


def recipe_batch_size() -> int:
    return int(yaml.safe_load(RECIPE.read_text())["train"]["batch_size"])


def write_llava_file(folder: Path, rows: int, seed: int = 0) -> Path:
    """`rows` LLaVA conversations of mixed lengths; two thirds with an image (small PNGs written beside it)."""
    generator = random.Random(seed)
    for index in range(4):
        Image.new("RGB", (32, 32), tuple(generator.randrange(256) for _ in range(3))).save(folder / f"{index}.png")
    records = []
    for row in range(rows):
        turns = []
        for turn in range(generator.choice([1, 1, 1, 2, 3])):
            words = generator.choice([1, 2, 4, 8, 16, 32, 48])  # one word to a few sentences
            answer = " ".join(generator.choice(WORDS) for _ in range(words)).capitalize() + "."
            turns += [{"from": "human", "value": generator.choice(QUESTIONS)}, {"from": "gpt", "value": answer}]
        record = {"id": row, "conversations": turns}
        if row % 3:
            record["image"] = f"{row % 4}.png"
            turns[0]["value"] = "<image>\n" + turns[0]["value"]
        records.append(record)
    path = folder / "mixed.json"
    path.write_text(json.dumps(records))
    return path


def build_model(kind: str):
    from peft_vlm.embedded.models import default_language_model_path, register_default_vision

    if kind == "embedded":
        model = pv.VisionLanguageModel.from_pretrained("embedded")
    else:  # the embedded tokenizer and tower around a tiny random LLaMA: the same sequences, a fast step
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(default_language_model_path())
        common.SHAPES["tiny-embedded-vocab"] = {**common.SHAPES["tiny"], "vocab_size": len(tokenizer)}
        llm = common.build_base("tiny-embedded-vocab")
        model = pv.VisionLanguageModel.from_pretrained(llm=llm, tokenizer=tokenizer, vision=register_default_vision())
    return pv.apply(model, peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))


def step_on(model, batch):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()

    return step


def cpu_name() -> str:
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return "unknown"
    names = [line.split(":", 1)[1].strip() for line in output.splitlines() if line.startswith("Model name")]
    return names[0] if names else "unknown"


def main(argv=None) -> None:
    parser = common.parser("padding and step time with and without packing", steps=3, warmup=1)
    parser.add_argument("--model", default="embedded", choices=["embedded", "tiny"])
    parser.add_argument("--rows", type=int, default=64, help="conversations in the LLaVA file")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the llava_lora recipe's")
    args = common.parse(parser, argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.quick:
        args.rows, args.steps, args.warmup = min(args.rows, 16), 1, 0
    batch_size = args.batch_size or recipe_batch_size()
    model = build_model(args.model).train()
    with tempfile.TemporaryDirectory() as folder:
        dataset = SampleDataset(read_dataset(write_llava_file(Path(folder), args.rows), "llava"),
                                SampleEncoder.for_model(model))
        examples = [dataset[i] for i in range(len(dataset))]
        chunks = [examples[i: i + batch_size] for i in range(0, len(examples), batch_size)]
        collate = {"padded": Collator.for_model(model), "packed": Collator.for_model(model, packing=True)}
        batches = {name: [c(chunk) for chunk in chunks] for name, c in collate.items()}
        load_before = common.load_average()
        times = common.side_by_side({name: step_on(model, b[0]) for name, b in batches.items()},
                                    args.steps, args.warmup, args.device)
    lengths = [len(e["input_ids"]) for e in examples]
    rows = []
    for name, collated in batches.items():
        positions = sum(b["input_ids"].numel() for b in collated)
        tokens = sum(b.num_tokens for b in collated)
        rows.append([name, f"{sum(len(b['input_ids']) for b in collated) / len(collated):.1f}", f"{positions:,}",
                     f"{tokens:,}", f"{1 - tokens / positions:.1%}", f"{times[name] * 1000:.0f}",
                     f"{times[name] / times['padded']:.2f}"])
    lines = common.table(["batches", "rows per batch", "positions computed", "real tokens", "pad share",
                          "step on batch 1 (ms)", "vs padded"], rows)
    described = ("SmolLM2-135M-Instruct + embedded tower" if args.model == "embedded"
                 else "tiny random LLaMA, embedded tokenizer and tower")
    setup = (f"{args.model} model ({described}), {model.tokens_per_image} visual tokens per image, "
             f"LoRA r=8 (q, v), float32; {len(examples)} LLaVA-format conversations ({min(lengths)} to "
             f"{max(lengths)} tokens, two thirds with an image) in batches of {batch_size} (llava_lora recipe); "
             f"median of {args.steps} alternating steps after {args.warmup} warm-up, device {args.device}, "
             f"CPU {cpu_name()}")
    notes = ["- pad share = padding positions / all positions over every batch; packed rows are as wide as the "
             "batch's longest example, so packing removes rows, never widens them",
             "- the step times are one step on the first batch each way (same examples and tokens); on CPU the "
             f"packed step also pays its 4D mask; load average {load_before} before, {common.load_average()} after"]
    if args.model == "tiny":
        notes.append("- the tiny decoder (4 layers, width 64) makes the step mostly the vision tower and the "
                     "49,152-way LM head and loss: its step ratio is not what a real LM's step would show")
    common.report("bench_packing", setup, lines, notes, args.device, not args.no_record)


if __name__ == "__main__":
    main()
