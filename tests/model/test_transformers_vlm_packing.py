"""Packing on wrapped transformers VLMs: where the model's own forward takes a 4D mask and position ids as they are
(LLaVA, LLaVA-NeXT, Idefics3), each packed example's loss is its unpacked loss; the others refuse by name."""
import peft
import pytest
import torch
import torch.nn.functional as F

import peft_vlm as pv
from peft_vlm.data import Collator, SampleEncoder
from tiny_transformers_vlms import pictures, wrapped

QUESTIONS = [("What is in the picture?", "A red circle.", 1), ("What is the capital of France?", "Paris.", 0),
             ("Is there a shape? Describe the image in one sentence.", "Yes. A blue square.", 1),
             ("Red?", "Yes.", 0), ("The colour?", "Red.", 1)]


def samples():
    picture = iter(pictures(3))
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
             "images": [next(picture) for _ in range(n)], "source": f"row {i}"}
            for i, (q, a, n) in enumerate(QUESTIONS)]


def per_example_losses(model, batch):
    with torch.no_grad():
        logits = model(**batch).logits.float()
    if "sequence_ids" in batch:
        owners = batch["sequence_ids"]
    else:
        rows = torch.arange(len(batch["input_ids"]))[:, None].expand_as(batch["input_ids"])
        owners = torch.where(batch["attention_mask"].bool(), rows, -1)
    targets, owners = batch["labels"][:, 1:], owners[:, 1:]
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="none")
    labelled = targets != -100
    return {int(e): float(losses[labelled & (owners == e)].mean()) for e in owners[labelled].unique()}


@pytest.mark.parametrize("name", ["llava", "llava_next", "idefics3"])
def test_each_examples_loss_packed_equals_its_loss_unpacked(name):
    model = pv.apply(wrapped(name), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for key, parameter in model.named_parameters():
            if "lora_B" in key:
                parameter.normal_(0, 0.5)
    examples = [SampleEncoder.for_model(model)(s) for s in samples()]
    plain, packed = Collator.for_model(model)(examples), Collator.for_model(model, packing=True)(examples)
    assert len(packed["input_ids"]) < len(plain["input_ids"]) and packed.pad_share < plain.pad_share
    alone, together = per_example_losses(model, plain), per_example_losses(model, packed)
    assert sorted(alone) == sorted(together) == list(range(len(examples)))
    for index in alone:
        assert together[index] == pytest.approx(alone[index], abs=1e-5), index


@pytest.mark.parametrize("name, reason", [("qwen2_vl", "M-RoPE"), ("paligemma", "token_type_ids"),
                                          ("gemma3", "token_type_ids")])
def test_a_wrapped_model_whose_forward_cannot_take_packed_rows_refuses_them_by_name(name, reason):
    model = wrapped(name)
    with pytest.raises(pv.ConfigError, match=f"wrapped {name} model cannot train on packed rows: .*{reason}"):
        Collator.for_model(model, packing=True)
