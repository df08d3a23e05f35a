"""Attention extensions: an AttentionInterface twin of the model's own attention that methods can add to."""
import pytest
import torch

from peft_vlm.runtime import attention


def _batch():
    ids = torch.randint(4, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    return ids, mask


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_switching_to_the_extensible_twin_changes_no_logit(lm_factory, implementation):
    model = lm_factory()
    model.config._attn_implementation = implementation
    ids, mask = _batch()
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
        assert attention.install(model) == "peft_vlm_" + implementation
        after = model(ids, attention_mask=mask).logits
    assert model.config._attn_implementation == "peft_vlm_" + implementation
    assert (after - before).abs().max().item() == 0


def test_extension_sees_each_layer_once_with_rotated_query_and_its_addition_reaches_the_output(lm_factory):
    model = lm_factory()
    ids, mask = _batch()
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
    seen = []

    def extension(call):
        seen.append((call.module.layer_idx, tuple(call.query.shape), tuple(call.key.shape)))
        return torch.full_like(call.output, 0.1) if call.module.layer_idx == 1 else None

    modules = attention.attention_modules(model)
    for module in modules:
        attention.add_extension(model, module, extension)
    with torch.no_grad():
        after = model(ids, attention_mask=mask).logits
    # 4 query heads, 2 key/value heads (grouped-query attention), head dim 16
    assert seen == [(0, (2, 4, 9, 16), (2, 2, 9, 16)), (1, (2, 4, 9, 16), (2, 2, 9, 16))]
    assert not torch.allclose(before, after)
    for module in modules:
        attention.remove_extension(module, extension)
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, before)


def test_gated_token_attention_is_exactly_zero_with_zero_gates(lm_factory):
    model = lm_factory()
    module = attention.attention_modules(model)[0]
    query = torch.randn(2, 4, 5, 16)
    call = attention.AttentionCall(module, query, None, None, None, torch.zeros(2, 5, 4, 16))
    tokens = torch.randn(1, 3, 64)
    assert torch.equal(attention.gated_token_attention(call, tokens, torch.zeros(4)), torch.zeros(2, 5, 4, 16))
    assert attention.gated_token_attention(call, tokens, torch.ones(4)).abs().sum() > 0
