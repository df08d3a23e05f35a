"""`train.packing`: validated like every option, refused before training for a method that cannot take packed rows,
and a packed run trains on the same examples with less padding (the first step's loss is the unpacked one)."""
import peft
import pytest

import peft_vlm as pv
from peft_vlm.data import SampleDataset, SampleEncoder
from peft_vlm.data.formats import SampleList

QUESTIONS = [("What is in the picture?", "A red circle."), ("What is the capital of France?", "Paris."),
             ("Is there a shape? Describe the image in one sentence.", "Yes. A blue square and a green triangle."),
             ("Red?", "Yes.")]


def dataset(model, images):
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
             "images": [images[i % len(images)]] if i % 2 == 0 else [], "source": f"row {i}"}
            for i, (q, a) in enumerate(QUESTIONS * 2)]
    return SampleDataset(SampleList(rows), SampleEncoder.for_model(model))


def config(folder, packing):
    return pv.TrainConfig(output_dir=str(folder), max_steps=2, batch_size=4, learning_rate=1e-2, report_to=None,
                          progress_bar=False, checkpoint_every=0, packing=packing)


def test_packing_is_a_bool_option_validated_by_name():
    assert pv.TrainConfig().packing is False
    with pytest.raises(pv.ConfigError, match="packing"):
        pv.TrainConfig(packing="yes")
    assert pv.TrainConfig.from_dict({"packing": True}).packing is True


def test_a_packed_run_has_less_padding_and_starts_at_the_unpacked_loss(vlm_factory, images, tmp_path):
    histories = {}
    for packing in (False, True):
        model = pv.apply(vlm_factory(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        trainer = pv.JointTrainer(model, config(tmp_path / str(packing), packing), data=dataset(model, images))
        histories[packing] = trainer.train().history
    plain, packed = histories[False], histories[True]
    assert [h["tokens"] for h in packed] == [h["tokens"] for h in plain]  # the same examples, every token
    assert all(p["pad_share"] < u["pad_share"] for p, u in zip(packed, plain))
    assert packed[0]["loss"] == pytest.approx(plain[0]["loss"], abs=1e-5)


def test_a_method_that_cannot_take_packed_rows_is_refused_before_training(vlm_factory, images, tmp_path):
    model = pv.apply(vlm_factory(), pv.AdaptionPromptConfig(length=4, layers=2, multimodal=True))
    with pytest.raises(pv.ConfigError, match="method 'adaption_prompt' cannot train on packed rows"):
        pv.JointTrainer(model, config(tmp_path, True), data=dataset(model, images))
    assert not any(tmp_path.iterdir())  # nothing written
