"""What a user sees of a run: every stream's loss, the learning rates and the accuracy curve in TensorBoard."""
import sys
from pathlib import Path

import peft
import pytest
from PIL import Image

import peft_vlm as pv
from peft_vlm.data import SampleDataset, SampleEncoder
from peft_vlm.data.answer_protocol import AnswerProtocol
from peft_vlm.evaluation.curve import AccuracyCurve
from peft_vlm.evaluation.vqa import Question

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
from train_tiny import samples  # noqa: E402


@pytest.fixture
def joint(vlm_factory):
    model = pv.apply(vlm_factory(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    encoder = SampleEncoder.for_model(model)
    return model, SampleDataset(samples("caption", 8), encoder), SampleDataset(samples("instruction", 8), encoder)


def scalars(folder: Path) -> dict[str, list[int]]:
    """{tag: steps} of every scalar in the TensorBoard event files under `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[int]] = {}
    for events in sorted({path.parent for path in folder.rglob("events.out.tfevents.*")}):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for name in accumulator.Tags()["scalars"]:
            found.setdefault(name, []).extend(event.step for event in accumulator.Scalars(name))
    return found


def test_tensorboard_gets_both_streams_losses_the_learning_rates_and_the_accuracy_curve(joint, tmp_path):
    model, captions, instructions = joint
    questions = [Question("What colour?", colour, Image.new("RGB", (32, 32), rgb), kind)
                 for colour, rgb, kind in [("red", (220, 30, 30), "color"), ("blue", (30, 30, 220), "yes/no")]]
    curve = AccuracyCurve(questions, every=2, output_dir=tmp_path / "curve", protocol=AnswerProtocol(max_new_tokens=2))
    curve.measure(model, 0)  # before training: sent to the tracker with the first step
    config = pv.TrainConfig(output_dir=str(tmp_path / "run"), max_steps=4, batch_size=2, log_every=2,
                            group_learning_rates={"vision": 2e-3}, report_to="tensorboard", progress_bar=False,
                            checkpoint_every=0)
    pv.JointTrainer(model, config, caption_data=captions, instruction_data=instructions, callbacks=[curve]).train()
    logged = scalars(tmp_path / "run")
    # with log_every=2 every logged step is a caption step: the instruction loss is the mean of its window's steps
    for name in ("train/loss_caption", "train/loss_instruction", "train/loss", "train/lr_vision", "train/lr_language"):
        assert logged.get(name) == [2, 4], name
    for name in ("eval/accuracy_color", "eval/accuracy_yes_no", "eval/accuracy_all", "eval/accuracy_color_grey"):
        assert sorted(logged.get(name, [])) == [0, 2, 4], name


def test_a_trainable_group_no_stream_trains_is_named_once_at_the_start(joint, tmp_path):
    model, _, instructions = joint
    config = pv.TrainConfig(output_dir=str(tmp_path), max_steps=1, report_to=None, progress_bar=False)
    with pytest.warns(UserWarning, match=r"trainable group 'vision' \(\d+ parameter\(s\): connector\..*never moves.*"
                                         r"no caption_data") as caught:
        pv.JointTrainer(model, config, instruction_data=instructions)
    assert len([w for w in caught if "never moves" in str(w.message)]) == 1


def test_a_run_that_feeds_every_group_gets_no_such_warning(joint, tmp_path, recwarn):
    model, captions, instructions = joint
    config = pv.TrainConfig(output_dir=str(tmp_path), max_steps=1, report_to=None, progress_bar=False)
    pv.JointTrainer(model, config, caption_data=captions, instruction_data=instructions)
    assert not [w for w in recwarn if "never moves" in str(w.message)]
