"""One batch of samples with different image counts (two, one, none) through a wrapped model's encoder and collator:
each row keeps its own labels and image tokens, and gives the logits it gives alone; a training step moves only the
method; a model that cannot take a sample names it."""
import json

import peft
import pytest
import torch

import peft_vlm as pv
from conftest import train_steps
from peft_vlm.data import read_dataset
from tiny_transformers_vlms import pictures, wrapped

CONVERSING = ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3", "gemma3"]
ANSWERS = [["A red circle.", "Yes, both."], ["Red."], ["Paris."]]
IMAGES = [2, 1, 0]


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """LLaVA-format rows with two images (two turns), one image and no image, read back by the LLaVA reader."""
    folder = tmp_path_factory.mktemp("mixed")
    for index, picture in enumerate(pictures(3)):
        # sizes differ: LLaVA-NeXT's processor then gives the images different numbers of patches
        picture.resize((16 + 16 * index, 16)).save(folder / f"image{index}.png")
    rows = [
        {"image": ["image0.png", "image2.png"], "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": ANSWERS[0][0]},
            {"from": "human", "value": "And here? <image> Is there a shape?"},
            {"from": "gpt", "value": ANSWERS[0][1]}]},
        {"image": "image1.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": ANSWERS[1][0]}]},
        {"conversations": [
            {"from": "human", "value": "What is the capital of France?"}, {"from": "gpt", "value": ANSWERS[2][0]}]},
    ]
    (folder / "mixed.json").write_text(json.dumps(rows))
    dataset = read_dataset(folder / "mixed.json", "llava")
    return [dataset[index] for index in range(len(rows))]


def encoded(model, samples):
    encoder = model.sample_encoder()
    examples = [encoder(sample) for sample in samples]
    return examples, model.collator()(examples)


def labelled_spans(labels):
    positions = (labels != -100).nonzero().flatten().tolist()
    spans = []
    for previous, position in zip([None] + positions, positions):
        spans.append([position]) if previous is None or position != previous + 1 else spans[-1].append(position)
    return [labels[span] for span in spans]


def images_per_row(model, batch):
    """Runs of the model's image token in each row: one per image (the processor expands each image in one place)."""
    image = (batch["input_ids"] == model.image_token_id).long()
    starts = image[:, 1:] > image[:, :-1]
    return (starts.sum(1) + image[:, 0]).tolist()


@pytest.mark.parametrize("arch", CONVERSING)
def test_each_row_keeps_its_labels_and_its_image_tokens(arch, samples):
    model = wrapped(arch)
    examples, batch = encoded(model, samples)
    assert batch.sources == [sample["source"] for sample in samples]
    for row, answers in enumerate(ANSWERS):
        spans = labelled_spans(batch["labels"][row])
        assert [model.tokenizer.decode(span, skip_special_tokens=True).strip() for span in spans] == answers
    assert images_per_row(model, batch) == IMAGES
    for row, example in enumerate(examples):  # and as many image tokens as the processor gives the sample alone
        alone = int((example["input_ids"] == model.image_token_id).sum())
        assert int((batch["input_ids"][row] == model.image_token_id).sum()) == alone


@pytest.mark.parametrize("arch", CONVERSING)
def test_each_row_gives_the_logits_it_gives_alone(arch, samples):
    model = wrapped(arch)
    examples, batch = encoded(model, samples)
    with torch.no_grad():
        together = model(**batch).logits
        for row, example in enumerate(examples):
            alone = model(**model.collator()([example])).logits[0]
            width = alone.shape[0]  # left padding: the row's own tokens are its last `width` positions
            assert torch.allclose(together[row, -width:], alone, atol=1e-4, rtol=0), f"row {row}"


@pytest.mark.parametrize("arch", CONVERSING)
def test_a_training_step_on_a_mixed_batch_moves_only_the_method(arch, samples):
    model = wrapped(arch)
    pv.apply(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    _, batch = encoded(model, samples)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses = train_steps(model, batch, 2, lr=5e-2)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if n in trainable)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_paligemma_names_the_sample_without_an_image(samples):
    model = wrapped("paligemma")
    encoder = model.sample_encoder()
    encoder(samples[1])  # one image, one turn: fine
    with pytest.raises(pv.ConfigError, match="mixed.json:row 3: paligemma takes one image per sample"):
        encoder(samples[2])


def test_inputs_a_model_cannot_batch_name_the_sample(samples):
    model = wrapped("llava")
    examples, _ = encoded(model, samples[:2])
    examples[1]["pixel_values"] = torch.nn.functional.interpolate(examples[1]["pixel_values"], size=(32, 32))
    with pytest.raises(pv.ConfigError, match="mixed.json:row 2: llava cannot batch its pixel_values of shape "
                                             r"\(1, 3, 32, 32\) with .*mixed.json:row 1's \(2, 3, 16, 16\)"):
        model.collator()(examples)
