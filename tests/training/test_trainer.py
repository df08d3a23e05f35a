"""JointTrainer: disjoint parameter groups, exact resume after a kill, DDP and FSDP2 equal to one process."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file

import peft_vlm as pv
from peft_vlm.data import SampleDataset, SampleEncoder

SCRIPT = Path(__file__).parents[1] / "scripts" / "train_tiny.py"
sys.path.insert(0, str(SCRIPT.parent))
from train_tiny import samples  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run_script(output, *args, processes=1, wait=True):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    command = [*launcher, str(SCRIPT), str(output), *map(str, args)]
    if not wait:  # in a session of its own, so that a signal can go to its whole process group, as a terminal's does
        return subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
    completed = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads((Path(output) / "history.json").read_text())


@pytest.fixture
def joint(vlm_factory):
    model = pv.apply(vlm_factory(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    encoder = SampleEncoder.for_model(model)
    return model, SampleDataset(samples("caption", 8), encoder), SampleDataset(samples("instruction", 8), encoder)


def group_tensors(model, group):
    return {n: p.detach().clone()
            for n, (p, _, g) in pv.runtime.tracking.named_tracked_parameters(model).items() if g == group}


def test_caption_steps_never_move_language_parameters_and_instruction_steps_never_move_vision(joint, tmp_path):
    model, captions, instructions = joint
    config = pv.TrainConfig(output_dir=str(tmp_path), max_steps=1, batch_size=2, weight_decay=0.5, learning_rate=1e-2,
                            report_to=None, progress_bar=False, checkpoint_every=0)
    trainer = pv.JointTrainer(model, config, caption_data=captions, instruction_data=instructions)
    trainer.model.train()
    for kind, moved, still in [("caption", "vision", "language"), ("instruction", "language", "vision"),
                               ("caption", "vision", "language")]:
        before_moved, before_still = group_tensors(model, moved), group_tensors(model, still)
        trainer._train_step(trainer.streams[kind])
        after_moved, after_still = group_tensors(model, moved), group_tensors(model, still)
        assert all(torch.equal(before_still[n], after_still[n]) for n in before_still), f"{kind} step moved {still}"
        assert any(not torch.equal(before_moved[n], after_moved[n]) for n in before_moved), (
            f"{kind} step did not train {moved}")


def test_each_group_has_its_own_optimizer_state(joint, tmp_path):
    model, captions, instructions = joint
    config = pv.TrainConfig(output_dir=str(tmp_path), max_steps=1, report_to=None, progress_bar=False)
    trainer = pv.JointTrainer(model, config, caption_data=captions, instruction_data=instructions)
    vision = {id(p) for g in trainer.optimizers["caption"].param_groups for p in g["params"]}
    language = {id(p) for g in trainer.optimizers["instruction"].param_groups for p in g["params"]}
    assert vision and language and not vision & language
    assert vision == {id(p) for p in model.connector.parameters()}


def test_parameter_learning_rates_give_matching_parameters_their_own_rate(joint, tmp_path):
    model, captions, instructions = joint
    config = pv.TrainConfig(output_dir=str(tmp_path), max_steps=1, batch_size=2, learning_rate=1e-4, weight_decay=0.0,
                            parameter_learning_rates={"*layers.0.*lora_B*": 1e-2}, report_to=None, progress_bar=False,
                            checkpoint_every=0)
    trainer = pv.JointTrainer(model, config, caption_data=captions, instruction_data=instructions)
    trainer.model.train()
    before = group_tensors(model, "language")
    trainer._train_step(trainer.streams["instruction"])
    # AdamW's first step moves every parameter with a gradient by its rate (LoRA's A has none while B is zero)
    moved = {n: (group_tensors(model, "language")[n] - before[n]).abs().max().item() for n in before if "lora_B" in n}
    first_layer = {n for n in moved if "layers.0." in n}
    assert first_layer and len(first_layer) < len(moved)
    assert all(moved[n] == pytest.approx(1e-2 if n in first_layer else 1e-4, rel=0.05) for n in moved)


def test_caption_ratio_spreads_caption_steps_evenly(joint, tmp_path):
    model, captions, instructions = joint
    config = pv.TrainConfig(output_dir=str(tmp_path), caption_ratio=0.25, report_to=None)
    trainer = pv.JointTrainer(model, config, caption_data=captions, instruction_data=instructions)
    kinds = [trainer.stream_for(step).name for step in range(8)]
    assert kinds == ["instruction", "instruction", "instruction", "caption"] * 2


def test_groups_that_overlap_or_match_nothing_are_refused(joint, tmp_path):
    model, captions, instructions = joint
    with pytest.raises(pv.ConfigError, match="must be disjoint"):
        pv.TrainConfig(caption_groups=("vision",), instruction_groups=("vision", "language"))
    config = pv.TrainConfig(output_dir=str(tmp_path), caption_groups=("experts",), report_to=None)
    with pytest.raises(pv.ConfigError, match=r"caption batches train groups \['experts'\]"):
        pv.JointTrainer(model, config, caption_data=captions, instruction_data=instructions)
    config = pv.TrainConfig(output_dir=str(tmp_path), parameter_learning_rates={"*.gaet": 1e-2}, report_to=None)
    with pytest.raises(pv.ConfigError, match=r"pattern\(s\) \['\*.gaet'\] match no trainable parameter"):
        pv.JointTrainer(model, config, caption_data=captions, instruction_data=instructions)


def test_non_finite_losses_are_skipped_and_too_many_stop_with_a_checkpoint(joint, tmp_path):
    model, captions, instructions = joint
    config = pv.TrainConfig(output_dir=str(tmp_path), max_steps=10, max_nonfinite_steps=3, report_to=None,
                            progress_bar=False)
    trainer = pv.JointTrainer(model, config, data=instructions)
    with torch.no_grad():
        model.connector.mlp[0].weight.fill_(float("nan"))
    before = group_tensors(model, "language")
    with pytest.raises(pv.training.TrainingStopped, match="3 steps in a row had a non-finite loss"):
        trainer.train()
    assert trainer.skipped_steps == 3
    assert all(torch.equal(before[n], t) for n, t in group_tensors(model, "language").items())
    assert (tmp_path / "checkpoints" / "step-0000003" / "adapter.safetensors").is_file()


def wait_for_checkpoint(process, checkpoints, name):
    deadline = time.time() + 120
    while not (checkpoints.is_dir() and any(p.name == name for p in checkpoints.iterdir())):
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.05)


def test_a_killed_run_resumes_exactly(tmp_path):
    uninterrupted = run_script(tmp_path / "full", "--max-steps", 10)
    process = run_script(tmp_path / "killed", "--max-steps", 10, "--sample-delay", 0.2, wait=False)
    wait_for_checkpoint(process, tmp_path / "killed" / "checkpoints", "step-0000004")
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "history.json").exists(), "the run finished before it could be killed"
    resumed = run_script(tmp_path / "killed", "--max-steps", 10)
    assert [h["loss"] for h in resumed] == [h["loss"] for h in uninterrupted]
    full = load_file(str(tmp_path / "full" / "adapter.safetensors"))
    again = load_file(str(tmp_path / "killed" / "adapter.safetensors"))
    assert all(torch.equal(full[n], again[n]) for n in full)


def test_ctrl_c_under_torchrun_stops_every_process_at_one_step_with_a_checkpoint_and_the_rerun_resumes_exactly(
        tmp_path):
    common = ["--max-steps", 8, "--checkpoint-every", 2]
    uninterrupted = run_script(tmp_path / "full", *common, processes=2)
    process = run_script(tmp_path / "stopped", *common, "--sample-delay", 0.2, processes=2, wait=False)
    checkpoints = tmp_path / "stopped" / "checkpoints"
    wait_for_checkpoint(process, checkpoints, "step-0000002")
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in a terminal: SIGINT to the launcher's process group
    assert process.wait(timeout=120) != 0
    stopped_at = re.findall(r"stopped by SIGINT after step (\d+)", process.stderr.read().decode())
    assert len(stopped_at) == 2 and len(set(stopped_at)) == 1, stopped_at  # both ranks, at the same step
    assert 2 < int(stopped_at[0]) < 8 and (checkpoints / f"step-{int(stopped_at[0]):07d}").is_dir()
    resumed = run_script(tmp_path / "stopped", *common, processes=2)
    assert [h["loss"] for h in resumed] == [h["loss"] for h in uninterrupted]


@pytest.mark.parametrize("sharding", ["ddp", "fsdp2"])
def test_two_processes_write_the_same_adapter_as_one(tmp_path, sharding):
    common = ["--max-steps", 4, "--checkpoint-every", 0, "--batch-size", 2, "--lora-dropout", 0]
    run_script(tmp_path / "one", *common, "--accumulation", 2)
    run_script(tmp_path / "two", *common, "--sharding", sharding, processes=2)
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run["world_size"] == 2
    assert run["sharded"] == (sharding == "fsdp2")
    assert run["wrapper"] == ("FSDPVisionLanguageModel" if sharding == "fsdp2" else "DistributedDataParallel")
    one = load_file(str(tmp_path / "one" / "adapter.safetensors"))
    two = load_file(str(tmp_path / "two" / "adapter.safetensors"))
    assert one.keys() == two.keys() and len(one) > 0
    for name in one:
        assert one[name].numel() > 0
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_checkpointing_gives_the_same_step(vlm_factory, tmp_path):
    updated = []
    for checkpointing in (False, True):
        model = pv.apply(vlm_factory(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
                         pv.AdaptionPromptConfig(length=2, layers=2))
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith(".gate"):
                    parameter.fill_(0.5)
        encoder = SampleEncoder.for_model(model)
        config = pv.TrainConfig(output_dir=str(tmp_path / str(checkpointing)), max_steps=1, batch_size=2,
                                report_to=None, progress_bar=False, gradient_checkpointing=checkpointing)
        trainer = pv.JointTrainer(model, config, data=SampleDataset(samples("instruction", 4), encoder))
        trainer.model.train()
        trainer._train_step(trainer.streams["train"])
        updated.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    assert model.language_model.is_gradient_checkpointing
    for name in updated[0]:
        torch.testing.assert_close(updated[1][name], updated[0][name], rtol=1e-5, atol=1e-6, msg=name)
