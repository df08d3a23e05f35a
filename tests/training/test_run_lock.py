"""One trainer per output folder: a second trainer on a folder in use is refused at once, naming the first (pid,
host); the lock goes when the run ends, also on an error; a lock left by a process that died is taken over."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import peft
import pytest

import peft_vlm as pv
from peft_vlm.data import SampleDataset, SampleEncoder
from peft_vlm.training.run_lock import LOCK_NAME

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
from train_tiny import samples  # noqa: E402

HOLD = ("import sys; from peft_vlm.training.run_lock import take; lock = take(sys.argv[1]); "
        "print('locked', flush=True); sys.stdin.read()")


def trainer(vlm_factory, output, callbacks=()):
    model = pv.apply(vlm_factory(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    config = pv.TrainConfig(output_dir=str(output), max_steps=2, batch_size=2, report_to=None, progress_bar=False,
                            checkpoint_every=0)
    return pv.JointTrainer(model, config, data=SampleDataset(samples("instruction", 4), SampleEncoder.for_model(model)),
                           callbacks=list(callbacks))


def test_a_second_trainer_on_the_same_output_dir_is_refused_at_once_naming_the_first(vlm_factory, tmp_path):
    second = trainer(vlm_factory, tmp_path)
    refusals = []

    def start_the_second(first, step):
        with pytest.raises(pv.ConfigError) as refusal:
            second.train()
        refusals.append(str(refusal.value))

    trainer(vlm_factory, tmp_path, callbacks=[start_the_second]).train()
    assert refusals == [f"output_dir '{tmp_path}' is in use by another trainer (pid {os.getpid()} on "
                        f"{socket.gethostname()}); wait for it to end or choose another output_dir"] * 2
    assert not (tmp_path / LOCK_NAME).exists()  # removed when the first ended


def test_a_trainer_is_refused_while_another_process_holds_the_output_dir(vlm_factory, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(pv.__file__).parents[1])}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(pv.ConfigError, match=f"in use by another trainer \\(pid {holder.pid} on "):
            trainer(vlm_factory, tmp_path).train()
    finally:
        holder.communicate("")
    assert trainer(vlm_factory, tmp_path).train().steps == 2  # the OS dropped the lock with its process


def test_a_lock_file_left_by_a_process_that_died_is_taken_over(vlm_factory, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    assert trainer(vlm_factory, tmp_path).train().steps == 2
    assert not (tmp_path / LOCK_NAME).exists()


def test_the_lock_is_removed_when_training_fails(vlm_factory, tmp_path):
    def fail(trainer, step):
        assert json.loads((tmp_path / LOCK_NAME).read_text()) == {"pid": os.getpid(), "host": socket.gethostname()}
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        trainer(vlm_factory, tmp_path, callbacks=[fail]).train()
    assert not (tmp_path / LOCK_NAME).exists()
    assert trainer(vlm_factory, tmp_path).train().steps == 2
