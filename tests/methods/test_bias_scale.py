"""LLaMA-Adapter V2 bias/scale tuning: y = s * (W x + b) on the linear layers, RMSNorm weights unfrozen."""
import pytest
import torch
from torch import nn

import peft_vlm as pv
from peft_vlm.methods.bias_scale import BiasScale, is_merged


def _batch():
    ids = torch.randint(4, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return dict(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))


def _perturb(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BiasScale):
                module.bias.normal_(0, 0.1, generator=generator)
                module.scale.uniform_(0.5, 1.5, generator=generator)


def _structure(model):
    return [(name, type(module).__name__, bool(module._forward_hooks)) for name, module in model.named_modules()]


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_logits_at_init_equal_the_base_model_exactly(lm_factory, model_type, implementation):
    model = lm_factory(model_type)
    model.config._attn_implementation = implementation
    with torch.no_grad():
        before = model(**_batch()).logits
        pv.apply(model, pv.BiasScaleConfig())
        after = model(**_batch()).logits
    assert (after - before).abs().max().item() == 0


def test_llama_7b_counts_one_bias_and_one_scale_per_output_feature_and_65_norms(llama_7b_meta):
    c = llama_7b_meta.config
    pv.apply(llama_7b_meta, pv.BiasScaleConfig(targets="all-linear", norms=True))
    trainable = {n: p for n, p in llama_7b_meta.named_parameters() if p.requires_grad}
    added = sum(p.numel() for n, p in trainable.items() if ".bias_scale." in n)
    norms = sum(p.numel() for n, p in trainable.items() if "norm" in n)
    per_block = 4 * c.hidden_size + 2 * c.intermediate_size + c.hidden_size  # q, k, v, o + gate, up + down
    assert added == 2 * per_block * c.num_hidden_layers == 2_719_744
    assert norms == (2 * c.num_hidden_layers + 1) * c.hidden_size == 266_240
    assert not any(n.startswith("lm_head") for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == 2_719_744 + 266_240


def test_targets_name_the_layers_and_norms_can_stay_frozen(lm_factory):
    model = pv.apply(lm_factory(), pv.BiasScaleConfig(targets=["q_proj", "v_proj"], norms=False))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 2 * 2  # 2 layers x (q, v) x (bias, scale)
    assert all(".q_proj.bias_scale." in n or ".v_proj.bias_scale." in n for n in trainable)


def test_unknown_target_names_the_targets():
    with pytest.raises(pv.ConfigError, match="all-linear"):
        pv.BiasScaleConfig(targets="everything")


def test_merged_model_equals_unmerged_and_is_a_plain_model(lm_factory):
    plain = _structure(lm_factory())
    model = pv.apply(lm_factory(), pv.BiasScaleConfig())
    _perturb(model)
    with torch.no_grad():
        unmerged = model(**_batch()).logits
        assert (unmerged - lm_factory()(**_batch()).logits).abs().max() > 1e-2
        pv.merge(model)
        merged = model(**_batch()).logits
    assert is_merged(model)
    assert _structure(model) == plain  # no extra modules, no hooks
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


def test_unmerge_restores_base_weights_and_the_trainable_bias_scale(lm_factory):
    base = lm_factory()
    model = pv.apply(lm_factory(), pv.BiasScaleConfig())
    _perturb(model)
    with torch.no_grad():
        before = model(**_batch()).logits
    pv.unmerge(pv.merge(model))
    assert not is_merged(model)
    restored = {n: w for n, w in model.state_dict().items() if "bias_scale" not in n}
    assert restored.keys() == base.state_dict().keys()
    for name, original in base.state_dict().items():
        torch.testing.assert_close(restored[name], original, atol=1e-6, rtol=1e-6)
    assert all(p.requires_grad for n, p in model.named_parameters() if "bias_scale" in n)
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Linear))  # the tiny llama has no biases
    with torch.no_grad():
        torch.testing.assert_close(model(**_batch()).logits, before, atol=1e-5, rtol=1e-5)


def test_merge_then_generate_gives_the_same_tokens(lm_factory):
    model = pv.apply(lm_factory(), pv.BiasScaleConfig())
    _perturb(model)
    ids = torch.randint(4, 300, (1, 6), generator=torch.Generator().manual_seed(1))
    options = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    before = model.generate(ids, **options)
    after = pv.merge(model).generate(ids, **options)
    assert after.tolist() == before.tolist()


def test_on_a_4bit_base_bias_scale_trains_and_merge_warns_and_keeps_it(lm_factory, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    lm_factory().save_pretrained(tmp_path / "lm")
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "lm", quantization_config=quantization, device_map="cpu", dtype=torch.float32
    )
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    model.train()  # an eval-mode forward would repack the weights for bitsandbytes' CPU inference kernel
    with torch.no_grad():
        before = model(**_batch()).logits
    pv.apply(model, pv.BiasScaleConfig())
    with torch.no_grad():
        assert (model(**_batch()).logits - before).abs().max().item() == 0
    _perturb(model)
    model(**_batch()).logits.sum().backward()
    assert model.model.layers[0].mlp.down_proj.bias_scale.scale.grad.abs().sum() > 0
    with pytest.warns(UserWarning, match="stays unmerged"):
        pv.merge(model)
    assert not is_merged(model)
