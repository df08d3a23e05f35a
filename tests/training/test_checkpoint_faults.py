"""Checkpoints that survive faults: a corrupt or half-written newest checkpoint is skipped (named, with the reason)
and the run resumes from the newest intact one; at least one checkpoint is always kept; an output_dir that cannot
be written, and a model with merged methods, are refused when the trainer is built, before any step."""
import logging
import sys
from pathlib import Path

import peft
import pytest
import torch

import peft_vlm as pv
from peft_vlm.data import SampleDataset, SampleEncoder
from peft_vlm.training import checkpoint as ckpt

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
from train_tiny import samples  # noqa: E402

LOGGER = "peft_vlm.training.checkpoint"


def build(vlm_factory, output, max_steps=4, keep_checkpoints=3, checkpoint_every=2):
    """A seeded joint run (LoRA dropout on, so that the RNG states matter) and the steps its callback saw."""
    torch.manual_seed(0)
    model = pv.apply(vlm_factory(), peft.LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    encoder = SampleEncoder.for_model(model)
    config = pv.TrainConfig(output_dir=str(output), max_steps=max_steps, batch_size=2, learning_rate=1e-2,
                            report_to=None, progress_bar=False, checkpoint_every=checkpoint_every)
    config.keep_checkpoints = keep_checkpoints  # set after validation: the trainer must hold on its own
    steps = []
    trainer = pv.JointTrainer(model, config, caption_data=SampleDataset(samples("caption", 8), encoder),
                              instruction_data=SampleDataset(samples("instruction", 8), encoder),
                              callbacks=[lambda trainer, step: steps.append(step)])
    return trainer, steps


def train(vlm_factory, output, **options):
    trainer, steps = build(vlm_factory, output, **options)
    return trainer.train(), steps


def logged(caplog, level=logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == level]


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def assert_same_run(result, reference):
    assert [(h["stream"], h["loss"]) for h in result.history] == [(h["stream"], h["loss"]) for h in reference.history]
    got, expected = (pv.methods.adapter_file.read_adapter(r.adapter_path)[1] for r in (result, reference))
    assert got.keys() == expected.keys() and all(torch.equal(got[n], expected[n]) for n in expected)


@pytest.mark.parametrize("damaged", ["optimizer.safetensors", "adapter.safetensors", "trainer_state.json"])
def test_a_truncated_newest_checkpoint_is_skipped_by_name_and_the_run_resumes_from_the_newest_intact_one(
        vlm_factory, tmp_path, caplog, damaged):
    reference, _ = train(vlm_factory, tmp_path)
    newest = tmp_path / "checkpoints" / "step-0000004"
    truncate(newest / damaged)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        resumed, steps = train(vlm_factory, tmp_path)
    assert steps == [3, 4]  # continued after step 2
    skipped = logged(caplog)
    assert len(skipped) == 1 and f"'{newest}'" in skipped[0] and f"{damaged} is truncated or corrupt" in skipped[0]
    assert logged(caplog, logging.INFO) == [f"resuming from checkpoint '{newest.with_name('step-0000002')}' (step 2)"]
    assert_same_run(resumed, reference)
    assert (tmp_path / "checkpoints" / "step-0000004.corrupt" / damaged).is_file()  # kept aside, out of the rotation
    ckpt.read(newest, rank=0)  # the run wrote an intact step 4 again


def test_a_checkpoint_killed_while_being_written_is_ignored(vlm_factory, tmp_path, caplog):
    reference, _ = train(vlm_factory, tmp_path)
    newest = tmp_path / "checkpoints" / "step-0000004"
    half_written = newest.with_name("step-0000004.tmp")
    newest.rename(half_written)
    truncate(half_written / "optimizer.safetensors")
    (half_written / "trainer_state.json").unlink()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        resumed, steps = train(vlm_factory, tmp_path)
    assert steps == [3, 4] and not logged(caplog)
    assert not half_written.exists()
    assert_same_run(resumed, reference)


def test_with_no_intact_checkpoint_the_run_says_so_and_starts_from_step_0(vlm_factory, tmp_path, caplog):
    reference, _ = train(vlm_factory, tmp_path, checkpoint_every=0)  # one checkpoint, at the end
    (tmp_path / "checkpoints" / "step-0000004" / "trainer_state.json").write_text('{"step": 4')
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        again, steps = train(vlm_factory, tmp_path, checkpoint_every=0)
    messages = logged(caplog)
    assert steps == [1, 2, 3, 4]
    assert any("step-0000004" in m and "trainer_state.json is truncated or corrupt" in m for m in messages)
    assert any("no intact checkpoint" in m and "starts from step 0" in m for m in messages)
    assert_same_run(again, reference)


def test_keep_checkpoints_0_still_keeps_the_newest_so_a_rerun_continues(vlm_factory, tmp_path):
    _, steps = train(vlm_factory, tmp_path, max_steps=2, checkpoint_every=1, keep_checkpoints=0)
    assert steps == [1, 2]
    assert [p.name for p in ckpt.checkpoints(tmp_path)] == ["step-0000002"]
    _, steps = train(vlm_factory, tmp_path, max_steps=4, checkpoint_every=1, keep_checkpoints=0)
    assert steps == [3, 4]
    assert [p.name for p in ckpt.checkpoints(tmp_path)] == ["step-0000004"]


def unwritable_output_dirs(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    return {
        "a regular file": (a_file, "is a file, not a folder"),
        "a folder under a file": (a_file / "run", "is a file, not a folder"),
        "an existing folder nobody can write": (Path("/sys"), "is not writable"),  # sysfs: root included
        "a folder that cannot be created": (Path("/sys/peft-vlm-run"), "is not writable"),
    }


@pytest.mark.parametrize("case", ["a regular file", "a folder under a file", "an existing folder nobody can write",
                                  "a folder that cannot be created"])
def test_an_output_dir_that_cannot_be_written_is_refused_when_the_trainer_is_built(vlm_factory, tmp_path, case):
    output, reason = unwritable_output_dirs(tmp_path)[case]
    with pytest.raises(pv.ConfigError, match=rf"output_dir '{output}'.*{reason}") as refused:
        build(vlm_factory, output, checkpoint_every=0)  # without the check, the first write would come after all steps
    assert "Traceback" not in str(refused.value)
    assert not Path("/sys/peft-vlm-run").exists()


def test_training_a_model_with_merged_methods_is_refused_naming_pv_unmerge(vlm_factory, tmp_path):
    model = pv.apply(vlm_factory(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), pv.BiasScaleConfig())
    encoder = SampleEncoder.for_model(model)
    data = SampleDataset(samples("instruction", 4), encoder)
    config = pv.TrainConfig(output_dir=str(tmp_path), max_steps=1, report_to=None, progress_bar=False)
    pv.merge(model)
    with pytest.raises(pv.ConfigError, match=r"method\(s\) lora, bias_scale are merged.*pv\.unmerge\(model\)"):
        pv.JointTrainer(model, config, data=data)
    assert not (tmp_path / "checkpoints").exists()
    pv.unmerge(model)
    trainer = pv.JointTrainer(model, config, data=data)
    assert set(trainer.group_of) == set(pv.runtime.tracking.named_tracked_parameters(model))


def test_a_checkpoint_being_replaced_by_a_rerun_when_it_was_killed_comes_back(vlm_factory, tmp_path):
    reference, _ = train(vlm_factory, tmp_path)
    newest = tmp_path / "checkpoints" / "step-0000004"
    newest.rename(newest.with_name("step-0000004.tmp-replaced"))  # a rerun's final write had moved it aside ...
    newest.with_name("step-0000004.tmp").mkdir()  # ... and was killed before its own copy took the name
    again, steps = train(vlm_factory, tmp_path)
    assert steps == []  # resumed at step 4: nothing left to train
    assert_same_run(again, reference)
    assert sorted(p.name for p in newest.parent.iterdir()) == ["step-0000002", "step-0000004"]
