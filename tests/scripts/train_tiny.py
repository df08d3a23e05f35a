"""Joint training of a tiny random VLM (connector = vision group, LoRA = language group) on generated data.

    python tests/scripts/train_tiny.py OUTPUT_DIR [--max-steps N] [--checkpoint-every N] [--sharding ddp|fsdp2]
    python -m torch.distributed.run --nproc_per_node 2 tests/scripts/train_tiny.py OUTPUT_DIR ...

Writes OUTPUT_DIR/history.json (the loss of every step) next to the adapter and checkpoints.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import peft
from PIL import Image
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import make_tokenizer, make_vlm, register_tiny_vit  # noqa: E402

import peft_vlm as pv  # noqa: E402
from peft_vlm.data import SampleDataset, SampleEncoder, SampleList  # noqa: E402

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 20)}


def samples(kind: str, count: int) -> SampleList:
    rows = []
    for index in range(count):
        name, rgb = list(COLOURS.items())[index % len(COLOURS)]
        image = Image.new("RGB", (32, 32), rgb)
        if kind == "caption":
            messages = [{"role": "user", "content": "<image>\nDescribe the image."},
                        {"role": "assistant", "content": f"A {name} square."}]
        else:
            messages = [{"role": "user", "content": "<image>\nWhat colour?"}, {"role": "assistant", "content": name}]
        rows.append({"messages": messages, "images": [image], "source": f"{kind}:{index}"})
    return SampleList(rows)


class Slowed(SampleDataset):
    """Reads each sample after a pause, so that a test can kill the run in the middle."""

    delay = 0.0

    def __getitem__(self, index):
        time.sleep(self.delay)
        return super().__getitem__(index)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--checkpoint-every", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--sharding", default="ddp")
    parser.add_argument("--lora-dropout", type=float, default=0.1)
    parser.add_argument("--sample-delay", type=float, default=0.0)
    args = parser.parse_args()
    Slowed.delay = args.sample_delay

    tokenizer = make_tokenizer()
    vision = register_tiny_vit(Path(tempfile.mkdtemp()))
    model = make_vlm(tokenizer, vision)
    pv.apply(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=args.lora_dropout,
                                    target_modules=["q_proj", "v_proj"]))
    encoder = SampleEncoder.for_model(model)
    config = pv.TrainConfig(
        output_dir=args.output_dir, max_steps=args.max_steps, batch_size=args.batch_size,
        gradient_accumulation_steps=args.accumulation, learning_rate=5e-3, weight_decay=0.1, warmup_steps=2,
        checkpoint_every=args.checkpoint_every, caption_ratio=0.5, report_to=None, progress_bar=False,
        sharding=args.sharding,
    )
    trainer = pv.JointTrainer(
        model, config,
        caption_data=Slowed(samples("caption", 12), encoder),
        instruction_data=Slowed(samples("instruction", 12), encoder),
    )
    result = trainer.train()
    if trainer.accelerator.is_main_process:
        (Path(args.output_dir) / "history.json").write_text(json.dumps(result.history))
        sharded = any(isinstance(p, DTensor) for p in trainer.model.parameters())
        run = {"world_size": trainer.accelerator.num_processes, "sharded": sharded,
               "wrapper": type(trainer.model).__name__}
        (Path(args.output_dir) / "run.json").write_text(json.dumps(run))


if __name__ == "__main__":
    main()
