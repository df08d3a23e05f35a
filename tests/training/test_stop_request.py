"""Ctrl-C or SIGTERM during training stops after the step in progress with a checkpoint there, and a rerun resumes
from it exactly; a second Ctrl-C stops at once."""
import os
import signal
import sys
from pathlib import Path

import peft
import pytest
import torch

import peft_vlm as pv
from peft_vlm.data import SampleDataset, SampleEncoder
from peft_vlm.training.stop_request import StopRequest

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
from train_tiny import samples  # noqa: E402


def trainer_for(vlm_factory, output, callbacks=()):
    torch.manual_seed(0)
    model = pv.apply(vlm_factory(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    data = SampleDataset(samples("instruction", 8), SampleEncoder.for_model(model))
    config = pv.TrainConfig(output_dir=str(output), max_steps=6, batch_size=2, checkpoint_every=0, report_to=None,
                            progress_bar=False, seed=0)
    return pv.JointTrainer(model, config, data=data, callbacks=callbacks)


def signal_at(step, number):
    def callback(trainer, current):
        if current == step:
            os.kill(os.getpid(), number)
    return callback


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_training_saves_a_checkpoint_at_that_step_and_a_rerun_resumes_exactly(
        vlm_factory, tmp_path, number):
    handler_before = signal.getsignal(number)
    uninterrupted = trainer_for(vlm_factory, tmp_path / "full").train()
    stopped = trainer_for(vlm_factory, tmp_path / "stopped", [signal_at(3, number)])
    with pytest.raises(pv.training.TrainingStopped, match=f"stopped by {signal.Signals(number).name} after step 3"):
        stopped.train()
    assert [p.name for p in (tmp_path / "stopped" / "checkpoints").iterdir()] == ["step-0000003"]
    assert signal.getsignal(number) == handler_before  # the handler before training is back
    resumed = trainer_for(vlm_factory, tmp_path / "stopped").train()
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in uninterrupted.history]


def test_a_second_ctrl_c_stops_at_once():
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, whatever ran before
    try:
        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.received == signal.SIGINT
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.mark.parametrize("command", [["generate", "adapter.safetensors", "--prompt", "Hi"],
                                     ["eval", "adapter.safetensors"], ["train", "recipe.yaml"]])
def test_ctrl_c_outside_a_training_loop_stops_the_command_with_one_line(monkeypatch, capsys, command):
    from peft_vlm import cli

    def interrupted(arguments):  # Ctrl-C while a model loads, a tower pretrains or questions are answered
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, {"generate": "_generate", "eval": "_eval", "train": "_train"}[command[0]], interrupted)
    assert cli.main(command) == 130
    assert capsys.readouterr().err == f"peft-vlm {command[0]}: interrupted\n"
