"""Packing (`train.packing: true`): several examples share a row of a batch, each keeping its own positions, its own
attention and its own answer-only labels, so each example's loss is the one it has unpacked."""
import peft
import pytest
import torch
import torch.nn.functional as F

import peft_vlm as pv
from peft_vlm.data import Collator, SampleEncoder
from peft_vlm.data.collate import pack_rows
from peft_vlm.data.prompting import IGNORE_INDEX, IMAGE_TOKEN_ID
from peft_vlm.runtime.packing import block_causal_mask, packed_positions, varlen_arguments

QUESTIONS = [  # (prompt, answer, images): mixed lengths, with and without images
    ("What is in the picture?", "A red circle.", 1),
    ("Is there a shape? Describe the image in one sentence.", "Yes. A blue square and a green triangle.", 1),
    ("What is the capital of France?", "Paris.", 0),
    ("The colour?", "Red.", 1),
    ("Is there a shape?", "No.", 0),
    ("Red?", "Yes.", 0),
]


def samples(images, questions=QUESTIONS):
    picture = iter(images * 3)
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
             "images": [next(picture) for _ in range(n)], "source": f"row {i}"}
            for i, (q, a, n) in enumerate(questions)]


def example_ids(batch) -> torch.Tensor:
    """The example of each position: `sequence_ids` when packed, else the row (-1 on padding)."""
    if "sequence_ids" in batch:
        return batch["sequence_ids"]
    rows = torch.arange(len(batch["input_ids"]))[:, None].expand_as(batch["input_ids"])
    return torch.where(batch["attention_mask"].bool(), rows, -1)


def per_example_losses(model, batch, mask_packing: bool = True) -> dict[int, float]:
    """Mean cross-entropy over each example's answer tokens, from the full logits (`mask_packing=False`: a packed
    batch run as if its rows were single samples)."""
    inputs = {k: v for k, v in batch.items() if mask_packing or k != "sequence_ids"}
    with torch.no_grad():
        logits = model(**inputs, logits_to_keep=0).logits.float()
    targets = batch["labels"][:, 1:]
    owners = example_ids(batch)[:, 1:]
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    labelled = targets != IGNORE_INDEX
    return {int(e): float(losses[labelled & (owners == e)].mean()) for e in owners[labelled].unique()}


def test_rows_take_whole_examples_first_fit_longest_first_never_wider_than_the_longest():
    assert pack_rows([5, 9, 3, 4, 2]) == [[1], [0, 3], [2, 4]]  # 9 | 5+4 | 3+2
    assert pack_rows([4, 4, 4]) == [[0], [1], [2]]
    assert pack_rows([10, 3, 8], capacity=6) == [[0], [2], [1]]  # too long for a row: a row of its own


def test_positions_restart_and_the_mask_keeps_each_sample_to_itself():
    sequence_ids = torch.tensor([[-1, 0, 0, 2, 2, 2], [1, 1, 1, 3, 3, 4]])
    assert packed_positions(sequence_ids).tolist() == [[0, 0, 1, 0, 1, 2], [0, 1, 2, 0, 1, 0]]
    mask = block_causal_mask(sequence_ids)[:, 0]
    assert mask[0, 4].tolist() == [False, False, False, True, True, False]
    assert mask[1, 5].tolist() == [False] * 5 + [True]
    assert bool(mask.any(-1).all())  # every query, padding too, attends somewhere: no NaN softmax
    varlen = varlen_arguments(sequence_ids)
    assert varlen["cu_seq_lens_q"].tolist() == [0, 1, 3, 6, 9, 11, 12] and varlen["max_length_q"] == 3


def test_packed_batch_keeps_image_tokens_whole_and_each_examples_answer_labels(vlm_factory, images):
    model = vlm_factory()
    examples = [SampleEncoder.for_model(model)(s) for s in samples(images)]
    plain, packed = Collator(model.tokenizer.pad_token_id)(examples), Collator(model.tokenizer.pad_token_id,
                                                                               packing=True)(examples)
    assert len(packed["input_ids"]) < len(plain["input_ids"]) and packed.pad_share < plain.pad_share
    assert packed.num_tokens == plain.num_tokens and packed["input_ids"].shape[1] == plain["input_ids"].shape[1]
    for index, example in enumerate(examples):
        mine = packed["sequence_ids"] == index
        assert packed["input_ids"][mine].tolist() == example["input_ids"]  # contiguous, whole, in order
        assert packed["labels"][mine].tolist() == [IGNORE_INDEX, *example["labels"][1:]]
    owners = packed["sequence_ids"][packed["input_ids"] == IMAGE_TOKEN_ID].view(-1, model.tokens_per_image)
    assert owners.unique(dim=1).shape[1] == 1  # each image's tokens belong to one example
    assert owners[:, 0].tolist() == packed["image_sequences"].tolist()
    assert all(bool((packed["sequence_ids"][row] == example).any())  # each image's row holds its example
               for row, example in zip(packed["image_rows"].tolist(), packed["image_sequences"].tolist()))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_each_examples_loss_packed_equals_its_loss_unpacked(vlm_factory, images, attention):
    model = vlm_factory()
    model.language_model.config._attn_implementation = attention
    pv.apply(model, pv.AdaptionPromptConfig(length=4, layers=2), pv.BiasScaleConfig())
    with torch.no_grad():  # open the zero-init parts so that every method takes part
        for name, parameter in model.named_parameters():
            if parameter.requires_grad and name.endswith(("gate", "bias")):
                parameter.normal_(0, 0.5)
    examples = [SampleEncoder.for_model(model)(s) for s in samples(images)]
    plain = Collator(model.tokenizer.pad_token_id)(examples)
    packed = Collator(model.tokenizer.pad_token_id, packing=True)(examples)
    alone, together = per_example_losses(model, plain), per_example_losses(model, packed)
    assert sorted(alone) == sorted(together) == list(range(len(examples)))
    for index in alone:
        assert together[index] == pytest.approx(alone[index], abs=1e-5)
    mixed = per_example_losses(model, packed, mask_packing=False)
    assert any(abs(mixed[i] - alone[i]) > 1e-4 for i in alone)  # the same rows without the packed mask would mix
    with torch.no_grad():  # the batch loss (mean over every answer token) too
        assert float(model(**packed).loss) == pytest.approx(float(model(**plain).loss), abs=1e-5)


def opened(model):
    """Zero-init gates, expert differences and LoRA B set to random values, so that every method acts."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad and name.endswith(("gate", "bias", ".B", "lora_B.default.weight")):
                parameter.normal_(0, 0.5)
    return model


PACKED_METHODS = {
    "early fusion": [pv.EarlyFusionConfig(layers=2)],
    "early fusion, visual tokens in the sequence": [pv.EarlyFusionConfig(layers=2, visual_tokens_in_sequence=True)],
    "gated cross-attention": [pv.GatedCrossAttentionConfig(every=1)],
    "gated cross-attention, images outside the sequence": [
        pv.GatedCrossAttentionConfig(every=1, visual_tokens_in_sequence=False)],
    "visual expert r=4": [pv.VisualExpertConfig(rank=4)],
    "LoRA": [peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])],
}


@pytest.mark.parametrize("method", list(PACKED_METHODS))
def test_methods_that_read_images_see_only_their_own_samples_images_when_packed(vlm_factory, images, method):
    model = opened(pv.apply(vlm_factory(), *PACKED_METHODS[method]))
    examples = [SampleEncoder.for_model(model)(s) for s in samples(images)]
    plain = Collator(model.tokenizer.pad_token_id)(examples)
    packed = Collator(model.tokenizer.pad_token_id, packing=True)(examples)
    assert len(packed["input_ids"]) < len(plain["input_ids"])
    alone, together = per_example_losses(model, plain), per_example_losses(model, packed)
    for index in alone:
        assert together[index] == pytest.approx(alone[index], abs=1e-5), index


@pytest.mark.parametrize("configs, named", [
    ([pv.AdaptionPromptConfig(length=4, layers=2, multimodal=True)], "adaption_prompt"),
    ([pv.AdaptionPromptConfig(length=4, layers=2), pv.VisualQueryPromptConfig(width=16, depth=1, heads=2)],
     "adaption_prompt"),
    ([pv.VisualExpertConfig(rank=4, shared_image_position=True)], "visual_expert"),
])
def test_methods_that_pair_images_with_whole_rows_refuse_a_packed_batch_by_name(vlm_factory, images, configs, named):
    model = pv.apply(vlm_factory(), *configs)
    examples = [SampleEncoder.for_model(model)(s) for s in samples(images)]
    packed = Collator(model.tokenizer.pad_token_id, packing=True)(examples)
    with pytest.raises(pv.ConfigError, match=f"train.packing: method '{named}' cannot train on packed rows"):
        model(**packed)


def test_an_attention_kernel_that_cannot_keep_samples_apart_is_refused_by_name():
    from types import SimpleNamespace

    from peft_vlm.runtime.packing import check_kernel

    assert check_kernel(SimpleNamespace(_attn_implementation="peft_vlm_sdpa")) == "sdpa"
    assert check_kernel(SimpleNamespace(_attn_implementation="flash_attention_2")) == "flash_attention_2"
    with pytest.raises(pv.ConfigError, match="attention implementation 'flex_attention' cannot keep packed samples"):
        check_kernel(SimpleNamespace(_attn_implementation="flex_attention"))
