"""Speed levers of the training step: each must leave the loss and the gradients as they were."""
import peft
import pytest
import torch

import peft_vlm as pv
from peft_vlm.data.prompting import IGNORE_INDEX, supervised_span


def _loss_and_grads(model, batch, **options):
    model.zero_grad(set_to_none=True)
    loss = model(**batch, **options).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_the_lm_head_on_the_supervised_span_gives_the_full_heads_loss_and_gradients(vlm_factory, images):
    model = pv.apply(vlm_factory(), pv.BiasScaleConfig(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    batch = model.tokenize(["<image> what colour is it?", "a much longer question about the <image> here"],
                           [images[0], images[1]], answers=["red", "a circle on the left"])
    full_loss, full_grads = _loss_and_grads(model, batch, logits_to_keep=0)
    span_loss, span_grads = _loss_and_grads(model, batch)
    assert torch.allclose(span_loss, full_loss, atol=1e-6)
    assert full_grads.keys() == span_grads.keys() and len(full_grads) > 10
    for name, grad in full_grads.items():
        assert torch.allclose(span_grads[name], grad, atol=1e-6), name
    with torch.no_grad():
        kept = model(**batch).logits.shape[1]
    assert kept < batch["input_ids"].shape[1]  # the head really ran on fewer positions


def test_supervised_span_starts_one_before_the_first_label_of_any_row():
    labels = torch.full((2, 8), IGNORE_INDEX)
    labels[0, 6:] = 5
    labels[1, 4:] = 7
    cropped, keep = supervised_span(labels)
    assert keep == 5 and torch.equal(cropped, labels[:, 3:])
    cropped, keep = supervised_span(torch.full((1, 4), IGNORE_INDEX))
    assert keep == 2 and cropped.shape == (1, 2)


V2_METHODS = (pv.AdaptionPromptConfig(length=4, layers=2), pv.BiasScaleConfig(),
              pv.EarlyFusionConfig(layers=1, visual_tokens_in_sequence=True))


def _short_run_losses(model, batch, steps=4, bf16=False):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_plain_matmul_attention_trains_like_sdpa(vlm_factory, images):
    """`attn_implementation: eager` (the model's own matmul attention) gives the losses of SDPA within float
    tolerance over a short run of the main job's methods, gates opening."""
    runs = []
    for attention in ("sdpa", "eager"):
        model = vlm_factory()
        model.language_model.set_attn_implementation(attention)
        pv.apply(model, *V2_METHODS)
        batch = model.tokenize(["<image> what colour?", "what shape is the <image> here?"], [images[0], images[1]],
                               answers=["red", "a circle"])
        runs.append(_short_run_losses(model, batch))
    assert runs[0][-1] < runs[0][0]  # it trains
    assert runs[0] == pytest.approx(runs[1], rel=1e-4, abs=1e-5)


def test_bf16_autocast_stays_within_its_stated_tolerance_of_fp32(vlm_factory, images):
    """bf16 autocast on the CPU: the losses of a short run stay within 2% of fp32's (the stated tolerance)."""
    runs = []
    for bf16 in (False, True):
        model = pv.apply(vlm_factory(), *V2_METHODS)
        batch = model.tokenize(["<image> what colour?"], [images[0]], answers=["red"])
        runs.append(_short_run_losses(model, batch, bf16=bf16))
    assert runs[1] == pytest.approx(runs[0], rel=0.02)
