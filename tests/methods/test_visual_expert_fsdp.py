"""The visual expert shards: FSDP2 on two CPU processes trains the same adapter as one process on the same data."""
import os
import subprocess
import sys
from pathlib import Path

import torch

from peft_vlm.methods.adapter_file import read_adapter

SCRIPT = Path(__file__).parents[1] / "scripts" / "train_visual_expert.py"


def launch(launcher: list[str], output: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, *launcher, str(SCRIPT), str(output)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_fsdp2_on_two_processes_writes_the_same_adapter_as_one_process(tmp_path):
    runs = {
        "fsdp": launch(
            ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], tmp_path / "fsdp.safetensors"
        ),
        "single": launch([], tmp_path / "single.safetensors"),
    }
    for name, process in runs.items():
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, f"{name} run failed:\n{output[-4000:]}"
    fsdp_metadata, fsdp = read_adapter(tmp_path / "fsdp.safetensors")
    single_metadata, single = read_adapter(tmp_path / "single.safetensors")
    assert fsdp_metadata["methods"] == single_metadata["methods"]
    assert sorted(fsdp) == sorted(single)
    assert sum("expert" in name for name in fsdp) == 2 * 7  # every projection of both layers
    for name, tensor in fsdp.items():
        assert torch.allclose(tensor, single[name], rtol=1e-5, atol=1e-6), name
