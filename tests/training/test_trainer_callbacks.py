"""JointTrainer(callbacks=[...]): called after every optimizer step with the steps done; training unchanged by them."""
import sys
from pathlib import Path

import peft
import torch

import peft_vlm as pv
from peft_vlm.data import SampleDataset, SampleEncoder

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
from train_tiny import samples  # noqa: E402


def trainer_for(vlm_factory, output, callbacks=()):
    torch.manual_seed(0)
    model = pv.apply(vlm_factory(), peft.LoraConfig(r=4, lora_dropout=0.5, target_modules=["q_proj", "v_proj"]))
    encoder = SampleEncoder.for_model(model)
    config = pv.TrainConfig(output_dir=str(output), max_steps=4, batch_size=2, learning_rate=1e-2, report_to=None,
                            progress_bar=False, checkpoint_every=0)
    return pv.JointTrainer(model, config, caption_data=SampleDataset(samples("caption", 8), encoder),
                           instruction_data=SampleDataset(samples("instruction", 8), encoder), callbacks=callbacks)


def test_callbacks_run_after_every_optimizer_step_with_the_steps_done(vlm_factory, tmp_path):
    calls = []

    def record(trainer, step):
        calls.append((step, trainer.step, len(trainer.history), trainer.history[-1]["stream"]))

    trainer = trainer_for(vlm_factory, tmp_path,
                          callbacks=[record, lambda trainer, step: calls.append(("second", step))])
    result = trainer.train()
    recorded = [call for call in calls if call[0] != "second"]
    assert [call[:3] for call in recorded] == [(step, step, step) for step in range(1, 5)]
    assert [call[3] for call in recorded] == [h["stream"] for h in result.history]
    assert [call[1] for call in calls if call[0] == "second"] == [1, 2, 3, 4]
    assert calls.index(("second", 1)) == calls.index(recorded[0]) + 1  # in the order given, after each step


def test_a_callback_that_draws_random_numbers_and_switches_to_eval_does_not_change_training(vlm_factory, tmp_path):
    def evaluate(trainer, step):  # as an evaluation would: eval mode, sampling
        trainer.unwrapped.eval()
        torch.rand(100)

    plain = trainer_for(vlm_factory, tmp_path / "plain").train()
    with_callback = trainer_for(vlm_factory, tmp_path / "callback", callbacks=[evaluate]).train()
    assert [h["loss"] for h in with_callback.history] == [h["loss"] for h in plain.history]
    expected, got = (pv.methods.adapter_file.read_adapter(r.adapter_path)[1] for r in (plain, with_callback))
    assert expected.keys() == got.keys() and all(torch.equal(expected[n], got[n]) for n in expected)
