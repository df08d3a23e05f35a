"""JointTrainer under DeepSpeed ZeRO-2 and ZeRO-3 on two CPU processes (gloo), launched with `accelerate launch` and
the shipped configs: the same adapter as one process without DeepSpeed, groups not trained stay bitwise unchanged
(weight decay on), a NaN loss skips the step, a stopped run resumes exactly."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peft_vlm.methods.adapter_file import read_adapter

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "scripts" / "train_joint.py"
# Two processes, two micro-batches a step (DeepSpeed's accumulation); step 2: one micro-batch's loss is NaN
COMMON = ["--max-steps", 6, "--checkpoint-every", 2, "--nan-at", 2, "--accumulation", 2]


def launch(output: Path, *args, zero_stage: int | None = None) -> list[dict]:
    """One process without DeepSpeed, or `accelerate launch` with recipes/accelerate/deepspeed_zero{stage}.yaml."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for name in [n for n in env if n in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
                 or n.startswith("ACCELERATE_")]:
        env.pop(name)
    if zero_stage is None:
        launcher = [sys.executable]
    else:
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            port = free.getsockname()[1]
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(ROOT / "recipes" / "accelerate" / f"deepspeed_zero{zero_stage}.yaml"), "--num_processes", "2",
                    "--main_process_port", str(port)]
    completed = subprocess.run([*launcher, str(SCRIPT), str(output), *map(str, args)], env=env, capture_output=True,
                               text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    history = Path(output) / "history.json"
    return json.loads(history.read_text()) if history.exists() else []


def runs(output: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(output.glob("run-rank*.json"))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, no DeepSpeed, four micro-batches a step: the global batch of two processes."""
    output = tmp_path_factory.mktemp("one")
    history = launch(output, *COMMON, "--accumulation", 4)
    return history, load_file(str(output / "adapter.safetensors"))


def assert_same_adapter(output: Path, reference_tensors: dict, **tolerance) -> None:
    _, tensors = read_adapter(output / "adapter.safetensors")
    assert sorted(tensors) == sorted(reference_tensors) and len(tensors) > 0
    for name, tensor in tensors.items():
        assert tensor.shape == reference_tensors[name].shape and tensor.numel() > 0, name
        torch.testing.assert_close(tensor, reference_tensors[name], msg=name, **tolerance)


def assert_groups_kept_apart(output: Path, history: list[dict]) -> None:
    ranks = runs(output)
    assert len(ranks) == 2 and all(run["world_size"] == 2 for run in ranks)
    for run in ranks:
        assert [(c["step"], c["skipped"]) for c in run["checks"]] == [
            (h["step"], h["skipped"]) for h in history[-len(run["checks"]):]]
        for check in run["checks"]:
            assert check["others_unchanged"], f"step {check['step']} ({check['stream']}) moved another stream's group"
            assert check["trained_moved"] != check["skipped"], (
                f"step {check['step']}: trained {check['trained_moved']}, skipped {check['skipped']}")
        for key, steps in run["optimizer_steps"].items():  # AdamW steps of each partition: its stream's steps taken
            taken = sum(1 for h in history if h["stream"] == key.split("/")[0] and not h["skipped"])
            assert steps and all(step == taken for step in steps), (key, steps, taken)


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    output = tmp_path_factory.mktemp("zero3")
    return output, launch(output, *COMMON, zero_stage=3)


def test_zero2_on_two_processes_trains_like_one_process_and_keeps_the_groups_apart(tmp_path, reference):
    reference_history, reference_tensors = reference
    history = launch(tmp_path, *COMMON, zero_stage=2)
    assert [run["zero_stage"] for run in runs(tmp_path)] == [2, 2]
    assert [h["skipped"] for h in history] == [False, False, True, False, False, False]
    torch.testing.assert_close([h["loss"] for h in history], [h["loss"] for h in reference_history], equal_nan=True)
    assert_groups_kept_apart(tmp_path, history)
    assert_same_adapter(tmp_path, reference_tensors, rtol=1e-4, atol=1e-6)


def test_zero3_writes_the_full_tensors_of_the_one_process_run(zero3, reference):
    (output, history), (reference_history, reference_tensors) = zero3, reference
    assert [run["zero_stage"] for run in runs(output)] == [3, 3]
    assert_groups_kept_apart(output, history)
    # ZeRO-3 reduces in another order than one process: equal to float tolerance, not bitwise
    torch.testing.assert_close([h["loss"] for h in history], [h["loss"] for h in reference_history], equal_nan=True,
                               rtol=1e-5, atol=1e-5)
    assert_same_adapter(output, reference_tensors, rtol=1e-3, atol=5e-5)


def test_zero3_stopped_run_resumes_exactly(tmp_path, zero3):
    uninterrupted_output, uninterrupted = zero3
    launch(tmp_path, *COMMON, "--stop-after", 4, zero_stage=3)
    assert not (tmp_path / "adapter.safetensors").exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    history = launch(tmp_path, *COMMON, zero_stage=3)  # continues from the checkpoint of step 4
    assert [c["step"] for c in runs(tmp_path)[0]["checks"]] == [4, 5]
    assert_groups_kept_apart(tmp_path, history)
    assert [(h["stream"], h["skipped"]) for h in history] == [(h["stream"], h["skipped"]) for h in uninterrupted]
    torch.testing.assert_close([h["loss"] for h in history], [h["loss"] for h in uninterrupted], rtol=0, atol=0,
                               equal_nan=True)  # bitwise, and the NaN of step 2 where it was
    resumed = load_file(str(tmp_path / "adapter.safetensors"))
    expected = load_file(str(uninterrupted_output / "adapter.safetensors"))
    assert resumed.keys() == expected.keys() and all(torch.equal(resumed[n], expected[n]) for n in expected)


def test_stream_adamw_steps_only_the_active_streams_groups():
    from peft_vlm.training.deepspeed import StreamAdamW

    vision, language = torch.nn.Parameter(torch.ones(3, 3)), torch.nn.Parameter(torch.ones(3, 3))
    optimizer = StreamAdamW([{"params": [vision], "stream": "caption"},
                             {"params": [language], "stream": "instruction"}],
                            lr=0.1, weight_decay=0.5)
    for parameter in (vision, language):
        parameter.grad = torch.ones(3, 3)
    optimizer.active = ("caption",)
    optimizer.step()
    assert not torch.equal(vision, torch.ones(3, 3)) and torch.equal(language, torch.ones(3, 3))
    assert language not in optimizer.state and int(optimizer.state[vision]["step"]) == 1
    assert len(optimizer.param_groups) == 2
    optimizer.active = ()  # a skipped step
    optimizer.step()
    assert int(optimizer.state[vision]["step"]) == 1 and language not in optimizer.state


def test_a_deepspeed_config_that_disagrees_with_the_recipe_is_refused(tmp_path):
    from types import SimpleNamespace

    from peft_vlm.errors import ConfigError
    from peft_vlm.training.config import TrainConfig
    from peft_vlm.training.deepspeed import prepare

    ds_config = {"gradient_accumulation_steps": 1, "gradient_clipping": "auto",
                 "train_micro_batch_size_per_gpu": "auto"}
    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=ds_config)))
    config = TrainConfig(output_dir=str(tmp_path), gradient_accumulation_steps=4)
    with pytest.raises(ConfigError,
                       match=r"gradient_accumulation_steps=1 vs TrainConfig.gradient_accumulation_steps=4"):
        prepare(accelerator, torch.nn.Linear(2, 2), None, config)
    with pytest.raises(ConfigError, match=r"TrainConfig.sharding='fsdp2' does not apply under DeepSpeed"):
        prepare(accelerator, torch.nn.Linear(2, 2), None, TrainConfig(output_dir=str(tmp_path), sharding="fsdp2"))
