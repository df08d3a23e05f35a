"""Does the trained model use the image? LLaMA-Adapter V2 joint training on the embedded default, one lever at a time.

Trains the `llama-adapter-v2` preset (adaption prompts, bias/scale, early fusion) on the embedded default
(SmolLM2-135M-Instruct + the small open_clip ViT) with `JointTrainer`: easy-vqa caption batches update the `vision`
group, question batches the `language` group. Then it answers a fixed subset of easy-vqa test questions, the first
`--per-type` questions of each type in test-split order, once with the real image and once with a neutral grey
image. "overall" weights the per-type accuracies by the types' shares of the whole test split (yes/no 73.8%,
colour 13.2%, shape 13.0%), so it compares with the text-only ceiling on the full split (67.0%).

    python benchmarks/bench_vision_levers.py --steps 60                        # a quick look
    python benchmarks/bench_vision_levers.py --steps 240 --per-type 100        # full budget

One result line is printed and appended to benchmarks/VISION_LEVERS.md with the command, the load and the date.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

import peft_vlm as pv
from peft_vlm.data import SampleDataset, SampleEncoder
from peft_vlm.data import easy_vqa as ev
from peft_vlm.embedded.models import default_language_model_path, register_default_vision
from peft_vlm.evaluation.vqa import Question, grey_image, vqa_accuracy

RESULTS = Path(__file__).with_name("VISION_LEVERS.md")
HEADER = ("| date | load (1 min) | command | train s (CPU s) | steps | s/step | overall | colour | shape | yes/no "
          "| grey: overall | grey: colour | grey: shape | grey: yes/no |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3, help="language group")
    parser.add_argument("--vision-lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--caption-ratio", type=float, default=0.5)
    parser.add_argument("--connector", default="downsample2x2_mlp")
    parser.add_argument("--chat", action=argparse.BooleanOptionalAction, default=False,
                        help="SmolLM2's chat template (adds a 20-token system prompt) instead of "
                             "'USER: ... ASSISTANT:'")
    parser.add_argument("--yes-no-weight", type=float, default=1.0, help="type_weights of the question data")
    parser.add_argument("--feature-layer", type=int, default=-2)
    parser.add_argument("--tower-steps", type=int, default=0,
                        help="use the small tower pretrained contrastively for this many steps (0: random ViT-S)")
    parser.add_argument("--per-type", type=int, default=50, help="test questions of each type")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-record", action="store_true")
    return parser.parse_args()


def build_model(args):
    vision, weights = register_default_vision(), None
    if args.tower_steps:
        from peft_vlm.embedded.tower_pretraining import PRETRAINED_VISION, pretrained_tower

        vision, weights = PRETRAINED_VISION, pretrained_tower(steps=args.tower_steps)
    model = pv.VisionLanguageModel.from_pretrained(
        default_language_model_path(), vision=vision, vision_pretrained=weights, connector=args.connector,
        vision_options={"feature_layer": args.feature_layer},
    )
    model.use_chat_template = args.chat
    pv.apply(model, "llama-adapter-v2")
    return model


def test_questions(per_type: int) -> list[Question]:
    chosen, seen = [], Counter()
    for q in ev.questions("test"):
        kind = ev.question_type(q.text)
        if seen[kind] < per_type:
            seen[kind] += 1
            chosen.append(Question(q.text, q.answer, q.image, kind))
    return chosen


def weighted_overall(accuracy) -> float:
    shares = Counter(ev.question_type(q.text) for q in ev.questions("test"))
    return sum(accuracy[kind] * count for kind, count in shares.items()) / sum(shares.values())


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.time()
    model = build_model(args)
    print(pv.trainable_summary(model))
    encoder = SampleEncoder.for_model(model)
    captions = SampleDataset(ev.caption_samples("train"), encoder)
    weights = {"yes/no": args.yes_no_weight} if args.yes_no_weight != 1 else None
    instructions = SampleDataset(ev.instruction_samples("train", type_weights=weights), encoder)
    config = pv.TrainConfig(
        output_dir=tempfile.mkdtemp(prefix="vision_levers_"), max_steps=args.steps, batch_size=args.batch_size,
        learning_rate=args.lr, group_learning_rates={"vision": args.vision_lr}, warmup_steps=args.warmup,
        caption_ratio=args.caption_ratio, report_to=None, checkpoint_every=0, progress_bar=False, seed=args.seed,
    )
    trainer = pv.JointTrainer(model, config, caption_data=captions if args.caption_ratio > 0 else None,
                              instruction_data=instructions if args.caption_ratio < 1 else None)
    cpu = time.process_time()
    result = trainer.train()
    cpu = time.process_time() - cpu  # with the machine shared, CPU seconds / 2 is the time on 2 idle cores
    for stream in ("caption", "instruction"):
        losses = [h["loss"] for h in result.history if h["stream"] == stream]
        if losses:
            tenth = max(1, len(losses) // 10)
            print(f"{stream} loss: first {sum(losses[:tenth]) / tenth:.3f}  last {sum(losses[-tenth:]) / tenth:.3f}")

    questions = test_questions(args.per_type)
    real = vqa_accuracy(model, questions, batch_size=32, max_new_tokens=4)
    grey = vqa_accuracy(model, questions, batch_size=32, max_new_tokens=4, replace_image=grey_image(model))
    for question, expected, answered in real.examples[:: max(1, len(questions) // 6)]:
        print(f"  {question!r}: expected {expected!r}, answered {answered!r}")

    def cells(accuracy):
        return [f"{100 * weighted_overall(accuracy):.1f}"] + [f"{100 * accuracy[k]:.1f}" for k in ev.QUESTION_TYPES]

    load = os.getloadavg()[0]
    command = "python benchmarks/bench_vision_levers.py " + " ".join(sys.argv[1:])
    row = [datetime.date.today().isoformat(), f"{load:.1f}", f"`{command}`", f"{result.seconds:.0f} ({cpu:.0f})",
           str(result.steps),
           f"{result.seconds / result.steps:.2f}", *cells(real), *cells(grey)]
    print(f"train {result.seconds:.0f} s ({result.seconds / result.steps:.2f} s/step, {cpu:.0f} CPU s), "
          f"total {time.time() - start:.0f} s, "
          f"load {load:.1f}\n  real: {real}  weighted overall {100 * weighted_overall(real):.1f}%"
          f"\n  grey: {grey}  weighted overall {100 * weighted_overall(grey):.1f}%")
    if not args.no_record:
        if not RESULTS.exists():
            RESULTS.write_text("# Does the model use the image? (benchmarks/bench_vision_levers.py)\n\n"
                               f"{__doc__.split(chr(10) + chr(10))[1]}\n\n{HEADER}")
        with RESULTS.open("a") as file:
            file.write("| " + " | ".join(row) + " |\n")


if __name__ == "__main__":
    main()
