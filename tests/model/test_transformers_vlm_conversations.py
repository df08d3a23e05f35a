"""Multi-turn, multi-image samples through a wrapped model's processor: labels on exactly the assistant turns, the
processor's own image tokens for every image, a training step; PaliGemma refuses them by name."""
import json

import peft
import pytest
import torch

import peft_vlm as pv
from peft_vlm.data import read_dataset
from tiny_transformers_vlms import pictures, wrapped

CONVERSING = ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3", "gemma3"]
ANSWERS = ["A red circle.", "Yes, both are round."]


def conversation_file(tmp_path) -> dict:
    """A LLaVA-format row with two turns and two images, read back by the LLaVA reader."""
    for index, picture in enumerate(pictures(2)):
        picture.save(tmp_path / f"image{index}.png")
    row = {"image": ["image0.png", "image1.png"], "conversations": [
        {"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": ANSWERS[0]},
        {"from": "human", "value": "And here? <image> Is there a shape?"}, {"from": "gpt", "value": ANSWERS[1]}]}
    (tmp_path / "chat.json").write_text(json.dumps([row]))
    return read_dataset(tmp_path / "chat.json", "llava")[0]


def labelled_spans(labels: torch.Tensor) -> list[torch.Tensor]:
    positions = (labels != -100).nonzero().flatten().tolist()
    spans = []
    for previous, position in zip([None] + positions, positions):
        if previous is None or position != previous + 1:
            spans.append([position])
        else:
            spans[-1].append(position)
    return [labels[span] for span in spans]


@pytest.mark.parametrize("arch", CONVERSING)
def test_labels_cover_exactly_every_assistant_turn(arch, tmp_path):
    model = wrapped(arch)
    example = model.sample_encoder()(conversation_file(tmp_path))
    spans = labelled_spans(example["labels"][0])
    assert [model.tokenizer.decode(span, skip_special_tokens=True).strip() for span in spans] == ANSWERS
    eos = model.tokenizer.convert_tokens_to_ids("<end_of_utterance>" if arch == "idefics3" else "</s>")
    assert all(int(span[-1]) == eos for span in spans)  # each turn's end token is learnt, nothing after it
    # labelled positions carry the input tokens themselves
    mask = example["labels"][0] != -100
    assert torch.equal(example["labels"][0][mask], example["input_ids"][0][mask])


@pytest.mark.parametrize("arch", CONVERSING)
def test_every_image_gets_the_image_tokens_its_processor_expands(arch, tmp_path):
    model = wrapped(arch)
    example = model.sample_encoder()(conversation_file(tmp_path))
    one = model.processor(text=[model.prompt_text("x", 1, True)], images=pictures(1), return_tensors="pt")
    per_image = int((one["input_ids"] == model.image_token_id).sum())
    assert per_image > 0
    assert int((example["input_ids"] == model.image_token_id).sum()) == 2 * per_image


@pytest.mark.parametrize("arch", CONVERSING)
def test_a_training_step_on_a_conversation_moves_only_the_method(arch, tmp_path):
    model = wrapped(arch)
    pv.apply(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    encoder, collate = model.sample_encoder(), model.collator()
    batch = collate([encoder(conversation_file(tmp_path))])
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if n in trainable)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_paligemma_refuses_a_conversation_naming_the_architecture(tmp_path):
    model = wrapped("paligemma")
    with pytest.raises(pv.ConfigError, match="chat.json:row 1: paligemma takes one image and one user turn"):
        model.sample_encoder()(conversation_file(tmp_path))


def test_turns_that_do_not_alternate_are_a_bad_row_naming_it(tmp_path):
    sample = conversation_file(tmp_path)
    sample["messages"] = sample["messages"][:1] + sample["messages"][2:]  # two user turns in a row
    with pytest.raises(pv.DataError, match="chat.json:row.*alternates user and assistant"):
        wrapped("llava").sample_encoder()(sample)
