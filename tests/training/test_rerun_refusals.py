"""A rerun in a folder that holds another run: one of other methods is refused before any of its checkpoints is
moved or removed; one with another max_steps says what it continues and what it returns."""
import logging
import sys
from pathlib import Path

import peft
import pytest

import peft_vlm as pv
from peft_vlm.data import SampleDataset, SampleEncoder

sys.path.insert(0, str(Path(__file__).parent))
from test_checkpoint_faults import samples, train  # noqa: E402

LOGGER = "peft_vlm.training.trainer"


def folder_state(output: Path) -> dict[str, bytes]:
    return {str(p.relative_to(output)): p.read_bytes() for p in sorted(output.rglob("*")) if p.is_file()}


def test_a_rerun_with_other_methods_is_refused_before_any_checkpoint_is_pruned(vlm_factory, tmp_path):
    train(vlm_factory, tmp_path, max_steps=6, keep_checkpoints=3, checkpoint_every=2)
    assert len(list((tmp_path / "checkpoints").iterdir())) == 3
    before = folder_state(tmp_path)
    model = pv.apply(vlm_factory(), peft.LoraConfig(r=2, target_modules=["k_proj"]))
    config = pv.TrainConfig(output_dir=str(tmp_path), max_steps=6, batch_size=2, report_to=None,
                            progress_bar=False, keep_checkpoints=1)
    data = SampleDataset(samples("instruction", 8), SampleEncoder.for_model(model))
    with pytest.raises(pv.ConfigError, match="was written for other methods"):
        pv.JointTrainer(model, config, data=data).train()
    assert folder_state(tmp_path) == before  # all three checkpoints, byte for byte


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


@pytest.mark.parametrize("max_steps", [2, 4])
def test_a_rerun_of_a_finished_run_says_no_step_is_trained_and_which_adapter_it_returns(
        vlm_factory, tmp_path, caplog, max_steps):
    train(vlm_factory, tmp_path, max_steps=4)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        result, steps = train(vlm_factory, tmp_path, max_steps=max_steps)
    assert steps == [] and result.steps == 4
    [message] = warnings_of(caplog)
    assert f"'{tmp_path}' holds a run already trained to step 4 (max_steps={max_steps} asked now)" in message
    assert "no step is trained; the adapter returned is the one of step 4" in message


def test_a_rerun_with_a_larger_max_steps_says_it_resumes_and_trains_on(vlm_factory, tmp_path, caplog):
    train(vlm_factory, tmp_path, max_steps=4)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        result, steps = train(vlm_factory, tmp_path, max_steps=6)
    assert steps == [5, 6] and result.steps == 6
    [message] = warnings_of(caplog)
    assert "(started with max_steps=4) at step 4 and training on to max_steps=6" in message


def test_a_rerun_that_simply_finishes_its_run_warns_of_nothing(vlm_factory, tmp_path, caplog):
    train(vlm_factory, tmp_path, max_steps=4, checkpoint_every=2)
    (tmp_path / "checkpoints" / "step-0000004").rename(tmp_path / "checkpoints" / "step-0000004.tmp")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _, steps = train(vlm_factory, tmp_path, max_steps=4)
    assert steps == [3, 4] and warnings_of(caplog) == []
