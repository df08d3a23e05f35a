"""LoRA and QLoRA through peft, injected into the language model only."""
import re
import peft
import transformers
import pytest
import torch

import peft_vlm as pv

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])


def nonzero_lora(model):
    """Move LoRA away from its B = 0 start, so that it changes the outputs."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_lora_leaves_logits_unchanged_at_init(lm_factory, model_type):
    model = lm_factory(model_type)
    ids = torch.randint(0, 300, (2, 12))
    before = model(ids).logits
    pv.apply(model, peft.LoraConfig(**LORA))
    assert (model(ids).logits - before).abs().max().item() == 0


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_training_lora_changes_only_adapter_parameters(vlm_factory, images, model_type):
    model = vlm_factory(model_type).train()
    pv.apply(model, peft.LoraConfig(**LORA))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    before = snapshot(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = model.tokenize(["What colour?"], [images[0]], answers=["red"])
    for _ in range(3):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= trainable
    assert any("lora_B" in n for n in changed)
    frozen = [n for n in before if n not in trainable]
    assert all(torch.equal(before[n], after[n]) for n in frozen)  # base LM and vision tower bitwise equal
    assert all(n.startswith("language_model.") or n.startswith("connector.") for n in trainable)


def test_lora_never_touches_vision_tower_or_connector(vlm_factory):
    model = vlm_factory()
    # "proj" matches modules in the vision tower and the connector too: they must stay untouched.
    pv.apply(model, peft.LoraConfig(r=2, target_modules=["proj", "q_proj"]))
    lora_names = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert lora_names and all(n.startswith("language_model.") for n in lora_names)


def test_lora_merge_then_unmerge_keeps_outputs(lm_factory):
    model = lm_factory()
    pv.apply(model, peft.LoraConfig(**LORA))
    nonzero_lora(model)
    ids = torch.randint(0, 300, (1, 10))
    adapted = model(ids).logits
    pv.merge(model)
    torch.testing.assert_close(model(ids).logits, adapted, atol=1e-5, rtol=1e-5)
    pv.unmerge(model)
    torch.testing.assert_close(model(ids).logits, adapted, atol=1e-5, rtol=1e-5)


def test_merged_lora_runs_only_the_base_modules(lm_factory):
    model = lm_factory()
    base_modules = [type(m) for m in model.modules()]
    pv.apply(model, peft.LoraConfig(**LORA))
    pv.merge(model)
    assert [type(m) for m in model.modules()] == base_modules
    pv.unmerge(model)
    assert any(isinstance(m, peft.tuners.lora.LoraLayer) for m in model.modules())


def test_peft_export_loads_with_plain_peft_and_gives_same_logits(lm_factory, tmp_path):
    model = lm_factory()
    pv.apply(model, peft.LoraConfig(**LORA))
    nonzero_lora(model)
    pv.export_peft(model, tmp_path / "peft")
    ids = torch.randint(0, 300, (2, 9))
    reloaded = peft.PeftModel.from_pretrained(lm_factory(), tmp_path / "peft")
    assert (reloaded(ids).logits - model(ids).logits).abs().max().item() == 0


def test_qlora_lowers_the_loss_on_a_fixed_batch(lm_factory, tokenizer, tiny_vit, images, tmp_path):
    lm_factory().save_pretrained(tmp_path / "lm")
    model = pv.VisionLanguageModel.from_pretrained(
        str(tmp_path / "lm"), tokenizer=tokenizer, vision=tiny_vit, load_in_4bit=True
    )
    assert model.language_model.is_loaded_in_4bit
    assert type(model.language_model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    pv.apply(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    batch = model.tokenize(["What colour?", "What shape?"], images[:2], answers=["red", "circle"])
    losses = []
    for _ in range(20):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5  # nats; a tiny random base learns slowly through attention alone


def test_qlora_gradients_survive_an_evaluation_pass(lm_factory, tokenizer, tiny_vit, images, tmp_path):
    """bitsandbytes repacks 4-bit weights for its CPU inference kernel on the first eval-mode forward, and that
    kernel has no backward: the gradients after an evaluation pass must equal those before it."""
    lm_factory().save_pretrained(tmp_path / "lm")
    model = pv.VisionLanguageModel.from_pretrained(
        str(tmp_path / "lm"), tokenizer=tokenizer, vision=tiny_vit, load_in_4bit=True
    )
    pv.apply(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    batch = model.tokenize(["What colour?", "What shape?"], images[:2], answers=["red", "circle"])

    def gradients():
        model.train()
        model(**batch).loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad()
        return grads

    before = gradients()
    model.eval()
    with torch.no_grad():
        model(**batch)
    after = gradients()
    # the projector's gradient reaches it through every 4-bit layer (LoRA's A matrices have none while B is zero)
    assert before["connector.mlp.0.weight"].abs().sum() > 0
    for name, grad in before.items():
        assert torch.allclose(after[name], grad, atol=1e-6), name


def test_a_4bit_model_evaluated_before_apply_trains_through_its_base(lm_factory, tmp_path):
    """A user's own 4-bit model, evaluated before `pv.apply` (its weights repacked for inference on an AVX-512 BF16
    CPU), gets the gradients of one never evaluated, up to the repacking's rounding of the quantisation scales."""
    from transformers import BitsAndBytesConfig

    lm_factory().save_pretrained(tmp_path / "lm")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.float32)
    ids = torch.randint(0, 300, (2, 9))

    def lowest_lora_gradient(evaluate_first: bool):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "lm", quantization_config=quantization, device_map="cpu", dtype=torch.float32)
        if evaluate_first:
            with torch.no_grad():
                model.eval()(ids)
        pv.apply(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        nonzero_lora(model)
        model.train()
        model(ids, labels=ids).loss.backward()
        return next(p.grad for n, p in model.named_parameters() if "layers.0.self_attn.q_proj.lora_A" in n)

    fresh, evaluated = lowest_lora_gradient(False), lowest_lora_gradient(True)
    assert fresh.abs().sum() > 0
    assert torch.nn.functional.cosine_similarity(evaluated.flatten(), fresh.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("options,named", [
    ({"r": 0}, "r=0"), ({"r": -4}, "r=-4"), ({"r": 10**11}, "r=100000000000"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern['q_proj']=0"),
    ({"lora_alpha": float("nan")}, "lora_alpha=nan"), ({"lora_alpha": 0}, "lora_alpha=0"),
    ({"lora_dropout": 1.5}, "lora_dropout=1.5"),
])
def test_a_python_lora_config_out_of_range_is_refused_by_name_with_the_model_untouched(vlm_factory, options, named):
    model = vlm_factory()
    before = {name: p.clone() for name, p in model.state_dict().items()}
    with pytest.raises(pv.ConfigError, match=re.escape(named)):
        pv.apply(model, peft.LoraConfig(target_modules=["q_proj"], **options))
    assert model.state_dict().keys() == before.keys()
    assert not any("lora_" in name for name, _ in model.named_modules())
