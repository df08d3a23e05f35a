"""LLaMA-Adapter v1: zero-init gated adaption prompts on the top layers, text and multimodal."""
import math

import peft
import pytest
import torch

import peft_vlm as pv
from conftest import assert_cached_generation_matches_full_decoding


def _padded_batch():
    ids = torch.randint(4, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _open_gates(model, value=0.5):
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".gate"):
                parameter.fill_(value)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_logits_at_init_equal_the_base_model_exactly(lm_factory, model_type, implementation):
    model = lm_factory(model_type)
    model.config._attn_implementation = implementation
    ids, mask, positions = _padded_batch()
    with torch.no_grad():
        before = model(ids, attention_mask=mask, position_ids=positions).logits
        pv.apply(model, pv.AdaptionPromptConfig(length=4, layers=2))
        after = model(ids, attention_mask=mask, position_ids=positions).logits
    assert (after - before).abs().max().item() == 0


def test_matches_peft_adaption_prompt_with_open_gates_and_grouped_query_attention(lm_factory):
    """Same prompts and gates as peft's implementation (one ungated-tanh gate per layer) give the same logits:
    prompts through the frozen key/value projections, no rotary position, a separate softmax, gated."""
    reference = peft.get_peft_model(
        lm_factory(), peft.AdaptionPromptConfig(adapter_len=3, adapter_layers=1, task_type="CAUSAL_LM")
    )
    ours = pv.apply(lm_factory(), pv.AdaptionPromptConfig(length=3, layers=1))
    wrapped = reference.base_model.model.model.layers[1].self_attn
    mine = ours.model.layers[1].self_attn.adaption_prompt
    assert not hasattr(ours.model.layers[0].self_attn, "adaption_prompt")  # top layer only
    with torch.no_grad():
        wrapped.adaption_gate.fill_(0.6)
        mine.prompt.copy_(wrapped.adaption_prompt[0])
        mine.gate.fill_(math.atanh(0.6))
    ids, mask, positions = _padded_batch()
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        got = ours(ids, attention_mask=mask, position_ids=positions).logits
        base = lm_factory()(ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert (got - base)[real].abs().max() > 1e-2
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)


def test_eager_and_sdpa_agree_with_open_gates(lm_factory):
    ids, mask, positions = _padded_batch()
    results = []
    for implementation in ("eager", "sdpa"):
        model = lm_factory()
        model.config._attn_implementation = implementation
        _open_gates(pv.apply(model, pv.AdaptionPromptConfig(length=4, layers=2)))
        with torch.no_grad():
            results.append(model(ids, attention_mask=mask, position_ids=positions).logits[mask.bool()])
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-5)


def test_llama_7b_gets_the_papers_1_2m_prompt_parameters(llama_7b_meta):
    config = llama_7b_meta.config
    pv.apply(llama_7b_meta, pv.AdaptionPromptConfig(length=10, layers=30))
    parameters = {n: p for n, p in llama_7b_meta.named_parameters() if p.requires_grad}
    prompts = sum(p.numel() for n, p in parameters.items() if n.endswith("adaption_prompt.prompt"))
    gates = sum(p.numel() for n, p in parameters.items() if n.endswith("adaption_prompt.gate"))
    assert prompts == 30 * 10 * config.hidden_size == 1_228_800
    assert gates == 30 * config.num_attention_heads == 960
    assert len(parameters) == 2 * 30
    assert all(p.is_meta for p in parameters.values())
    assert pv.trainable_summary(llama_7b_meta).trainable_parameters == 1_228_800 + 960


def test_cached_generation_equals_greedy_full_forward_decoding_with_open_gates(vlm_factory, images):
    model = vlm_factory("qwen2")
    _open_gates(pv.apply(model, pv.AdaptionPromptConfig(length=4, layers=2, multimodal=True)))
    batch = model.tokenize(["What is in the picture?", "Colour?"], [images[0], None])
    assert_cached_generation_matches_full_decoding(model, batch, steps=6)


def test_left_padding_does_not_change_the_real_tokens_outputs(vlm_factory, images):
    model = vlm_factory()
    _open_gates(pv.apply(model, pv.AdaptionPromptConfig(length=4, layers=2, multimodal=True)))
    prompts, row_images = ["What is in the picture? Describe it.", "Colour?"], [images[0], images[1]]
    batch = model.tokenize(prompts, row_images)
    with torch.no_grad():
        together = model(**batch).logits
        alone = model(**model.tokenize(prompts[1:], row_images[1:])).logits
    length = alone.shape[1]
    torch.testing.assert_close(together[1, -length:], alone[0], atol=1e-5, rtol=1e-5)


def test_multimodal_image_feature_reaches_image_rows_only(vlm_factory, images):
    model = vlm_factory()
    _open_gates(pv.apply(model, pv.AdaptionPromptConfig(length=4, layers=2, multimodal=True)))
    batch = model.tokenize(["What is in the picture?", "What is in the picture?"], [images[0], None])
    with torch.no_grad():
        with_feature = model(**batch).logits
        model.adaption_prompt_image_feature.projection.weight.zero_()
        model.adaption_prompt_image_feature.projection.bias.zero_()
        without_feature = model(**batch).logits
    assert (with_feature[0] - without_feature[0]).abs().max() > 1e-3
    assert torch.equal(with_feature[1], without_feature[1])


def test_multimodal_variant_needs_a_vision_language_model(lm_factory):
    with pytest.raises(pv.IncompatibleMethodsError, match="needs a pv.VisionLanguageModel"):
        pv.apply(lm_factory(), pv.AdaptionPromptConfig(multimodal=True))


def test_invalid_length_is_refused_with_a_clear_message():
    with pytest.raises(pv.ConfigError, match="length >= 1"):
        pv.AdaptionPromptConfig(length=0)
