"""Methods on wrapped transformers VLMs (tiny random LLaVA and Qwen2-VL): the guarantees of models built here."""
import peft
import pytest
import torch
from peft.tuners.lora import LoraLayer

import peft_vlm as pv
from conftest import train_steps
from tiny_transformers_vlms import BUILDERS, batch, wrapped

ARCHITECTURES = list(BUILDERS)
METHODS = {
    "lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
    "bias_scale": lambda: pv.BiasScaleConfig(),
    "adaption_prompt": lambda: pv.AdaptionPromptConfig(length=3, layers=2),
    "visual_expert": lambda: pv.VisualExpertConfig(),
    "visual_expert_lowrank": lambda: pv.VisualExpertConfig(rank=4),
    "bias_scale+lora+adaption_prompt": lambda: [pv.BiasScaleConfig(), peft.LoraConfig(r=4, target_modules=["q_proj"]),
                                                pv.AdaptionPromptConfig(length=3, layers=1)],
}
MERGEABLE = ["lora", "bias_scale"]


def configs(method):
    made = METHODS[method]()
    return made if isinstance(made, list) else [made]


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def trained(arch, method, seed=0):
    """A wrapped model with `method` applied and moved away from its start by a few AdamW steps."""
    model = wrapped(arch, seed)
    return train(pv.apply(model, *configs(method)))


def train(model, steps=3):
    inputs = batch(model)
    train_steps(model, inputs, steps, lr=5e-2)
    return model, inputs


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_method_leaves_logits_unchanged_at_init(arch, method):
    model = wrapped(arch)
    inputs = batch(model)
    before = logits(model, inputs)
    pv.apply(model, *configs(method))
    assert torch.allclose(logits(model, inputs), before, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_training_moves_only_the_methods_tensors(arch, method):
    model = wrapped(arch)
    before = snapshot(model)
    pv.apply(model, *configs(method))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    start = snapshot(model)
    model, _ = train(model)
    after = snapshot(model)
    changed = {n for n in start if not torch.equal(start[n], after[n])}
    assert changed and changed <= trainable
    # every tensor of the base (vision tower and projector included) is bitwise what it was before pv.apply
    assert all(torch.equal(before[n], after[n]) for n in before if n in after and n not in trainable)
    decoder = f"model.{model.family.decoder}."
    assert all(n.startswith(decoder) for n in trainable)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cached_generation_equals_full_decoding(arch, method):
    model, inputs = trained(arch, method)
    inputs.pop("labels")
    steps = 5
    eos = model.tokenizer.eos_token_id  # trained on short answers, the tiny models soon say eos: keep them talking
    cached = model.generate_ids(**inputs, max_new_tokens=steps, suppress_tokens=[eos])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    # per-position inputs that grow with the sequence, and their value for generated text (as generate extends them)
    # (PaliGemma's token type 1 marks the suffix, so its generated tokens; Gemma 3's marks image tokens only)
    text_type = 1 if model.family.suffix_answers else 0
    growing = {k: v for k, v in {"mm_token_type_ids": 0, "token_type_ids": text_type}.items() if k in inputs}
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", *growing)}
    types = {k: inputs[k] for k in growing}
    for _ in range(steps):
        last = logits(model, dict(extra, **types, input_ids=ids, attention_mask=mask, use_cache=False))[:, -1]
        last[:, eos] = -float("inf")
        next_token = last.argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, next_token], 1), torch.cat([mask, torch.ones_like(next_token)], 1)
        types = {k: torch.cat([t, torch.full_like(next_token, growing[k])], 1) for k, t in types.items()}
    assert cached.shape[1] == steps and cached.tolist() == ids[:, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_save_load_round_trip_and_wrong_base_refused(arch, method, tmp_path):
    model, inputs = trained(arch, method)
    expected = logits(model, inputs)
    pv.save_adapter(model, tmp_path)
    fresh = pv.load_adapter(wrapped(arch), tmp_path)
    assert torch.allclose(logits(fresh, inputs), expected, atol=1e-6, rtol=0)
    with pytest.raises(pv.AdapterMismatchError, match="weights"):
        pv.load_adapter(wrapped(arch, seed=1), tmp_path)


@pytest.mark.parametrize("method", MERGEABLE + ["bias_scale+lora+adaption_prompt"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_merge_folds_the_method_into_the_base(arch, method):
    model, inputs = trained(arch, method)
    expected = logits(model, inputs)
    pv.merge(model)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert torch.allclose(logits(model, inputs), expected, atol=1e-5, rtol=0)
    pv.unmerge(model)
    assert torch.allclose(logits(model, inputs), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lora_stays_out_of_the_vision_tower_and_projector(arch):
    model = wrapped(arch)
    # names that also exist in the vision towers (CLIP q_proj/v_proj/fc1, Qwen2-VL qkv/proj) and projectors
    pv.apply(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "fc1", "fc2", "qkv", "proj",
                                                          "linear_1", "linear_2"]))
    lora = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert lora and all(n.startswith(f"model.{model.family.decoder}.") for n in lora)
    assert not any(isinstance(m, LoraLayer) for m in model.vision_tower.modules())


REFUSED = {
    "early_fusion": lambda: pv.EarlyFusionConfig(layers=1),
    "visual_query_prompt": lambda: pv.VisualQueryPromptConfig(),
    "gated_cross_attention": lambda: pv.GatedCrossAttentionConfig(every=1),
    "multimodal adaption prompt": lambda: pv.AdaptionPromptConfig(length=2, layers=1, multimodal=True),
    "shared image position": lambda: pv.VisualExpertConfig(rank=2, shared_image_position=True),
}


@pytest.mark.parametrize("case", list(REFUSED))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_method_that_cannot_work_is_refused_before_the_model_is_touched(arch, case):
    model = wrapped(arch)
    pv.apply(model, pv.BiasScaleConfig())
    names = [n for n, _ in model.named_modules()]
    config = REFUSED[case]()
    with pytest.raises(pv.IncompatibleMethodsError, match=f"wrapped {arch} model: .+"):
        pv.apply(model, config)
    assert [n for n, _ in model.named_modules()] == names
    assert model._peft_vlm_state.names() == ["bias_scale"]
