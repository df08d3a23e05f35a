"""Joint training of the tiny VLM of tests/scripts/train_tiny.py, recording what every step moved.

    accelerate launch --config_file recipes/accelerate/deepspeed_zero2.yaml --num_processes 2 \
        tests/scripts/train_joint.py OUTPUT_DIR [--max-steps N] [--stop-after K]
    python tests/scripts/train_joint.py OUTPUT_DIR --accumulation 2     (one process: the reference)

Writes OUTPUT_DIR/history.json (the loss of every step) and OUTPUT_DIR/run.json: the world size, the DeepSpeed ZeRO
stage, for every step whether the tensors of the groups it does not train stayed bitwise equal and whether its own
moved, and (under DeepSpeed) the AdamW step count of every optimizer partition. With --stop-after K the run stops
before step K+1, after the checkpoint of step K, as a killed run would. With --nan-at K the loss of the second
micro-batch slot of step K (process 1's batch on two processes, the second micro-batch on one) is NaN.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import peft
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from conftest import make_tokenizer, make_vlm, register_tiny_vit  # noqa: E402
from train_tiny import samples  # noqa: E402

import peft_vlm as pv  # noqa: E402
from peft_vlm.data import SampleDataset, SampleEncoder  # noqa: E402


class Stop(Exception):
    pass


def optimizer_steps(trainer) -> dict[str, list[float]]:
    """AdamW's step count of every fp32 partition this process updates, by 'stream/group/decay'."""
    optimizer, zero = trainer.optimizer, trainer.model.optimizer
    if hasattr(zero, "fp32_partitioned_groups_flat"):  # ZeRO-3 empties the groups' params between steps
        pairs = [(zero.sub_group_to_group_id[i], flat) for i, flat in enumerate(zero.fp32_partitioned_groups_flat)]
    else:
        pairs = [(i, p) for i, group in enumerate(optimizer.param_groups) for p in group["params"]]
    steps: dict[str, list[float]] = {}
    for index, tensor in pairs:
        group = optimizer.param_groups[index]
        key = f"{group['stream']}/{group['group']}/{'decay' if group['weight_decay'] else 'no-decay'}"
        steps.setdefault(key, []).append(float(optimizer.state[tensor]["step"]) if tensor in optimizer.state else 0.0)
    return steps


def inject_nan(trainer, at_step: int) -> None:
    module, forward = trainer.unwrapped, trainer.unwrapped.forward
    world, rank = trainer.accelerator.num_processes, trainer.accelerator.process_index
    calls = {"step": -1, "micro": 0}

    def forward_with_nan(*args, **kwargs):
        if calls["step"] != trainer.step:
            calls.update(step=trainer.step, micro=0)
        slot = calls["micro"] * world + rank
        calls["micro"] += 1
        output = forward(*args, **kwargs)
        if trainer.step == at_step and slot == 1:
            output.loss = output.loss * float("nan")
        return output

    module.forward = forward_with_nan


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--max-steps", type=int, default=6)
    parser.add_argument("--checkpoint-every", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--stop-after", type=int, default=None)
    parser.add_argument("--nan-at", type=int, default=None, help="the loss of the second slot of this step is NaN")
    args = parser.parse_args()

    model = make_vlm(make_tokenizer(), register_tiny_vit(Path(tempfile.mkdtemp())))
    pv.apply(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    encoder = SampleEncoder.for_model(model)
    config = pv.TrainConfig(
        output_dir=args.output_dir, max_steps=args.max_steps, batch_size=2,
        gradient_accumulation_steps=args.accumulation,
        learning_rate=5e-3, weight_decay=0.1, warmup_steps=2, checkpoint_every=args.checkpoint_every,
        caption_ratio=0.5, report_to=None, progress_bar=False,
    )
    trainer = pv.JointTrainer(model, config, caption_data=SampleDataset(samples("caption", 12), encoder),
                              instruction_data=SampleDataset(samples("instruction", 12), encoder))
    group_of = trainer.group_of
    checks = []
    train_step = trainer._train_step

    def checked_step(stream):
        if trainer.step == args.stop_after:
            raise Stop
        before = trainer.full_tensors()
        metrics = train_step(stream)
        after = trainer.full_tensors()
        same = {name: torch.equal(before[name], after[name]) for name in before}
        trained = [name for name in same if group_of[name] in stream.groups]
        checks.append({
            "step": trainer.step, "stream": stream.name, "skipped": metrics["skipped"],
            "others_unchanged": all(same[n] for n in same if n not in trained),
            "trained_moved": not all(same[n] for n in trained),
        })
        return metrics

    trainer._train_step = checked_step
    if args.nan_at is not None:
        inject_nan(trainer, args.nan_at)
    try:
        result = trainer.train()
    except Stop:
        return
    run = {
        "world_size": trainer.accelerator.num_processes,
        "zero_stage": trainer.model.zero_optimization_stage() if trainer.deepspeed else None,
        "checks": checks,
        "optimizer_steps": optimizer_steps(trainer) if trainer.deepspeed else None,
    }
    if trainer.accelerator.is_main_process:
        (Path(args.output_dir) / "history.json").write_text(json.dumps(result.history))
    (Path(args.output_dir) / f"run-rank{trainer.accelerator.process_index}.json").write_text(json.dumps(run))


if __name__ == "__main__":
    main()
