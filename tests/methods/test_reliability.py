"""Operations that change a model complete or leave it exactly as it was: apply, load_adapter, merge, unmerge."""
import json

import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import peft_vlm as pv
from peft_vlm.methods.apply import is_merged

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def snapshot(model):
    """Everything a refused operation must leave as it was: tensors, module tree, hooks, trainable flags, methods."""
    from peft_vlm.runtime.tracking import state_of

    state = state_of(model, create=False)
    return {
        "tensors": {name: tensor.clone() for name, tensor in model.state_dict().items()},
        "modules": [(name, type(module).__name__, len(module._forward_hooks), len(module._forward_pre_hooks))
                    for name, module in model.named_modules()],
        "trainable": [name for name, p in model.named_parameters() if p.requires_grad],
        "methods": state.names() if state else [],
        "attn": model.config._attn_implementation,
    }


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["trainable"] == before["trainable"] and after["methods"] == before["methods"]
    assert after["attn"] == before["attn"]
    assert after["tensors"].keys() == before["tensors"].keys()
    assert all(torch.equal(after["tensors"][k], before["tensors"][k]) for k in before["tensors"])


@pytest.fixture
def batch(vlm_factory, images):
    return vlm_factory().tokenize(["What colour?", "Shape?"], images[:2], answers=["red", "circle"])


def test_apply_with_a_refused_later_config_leaves_the_model_as_it_was(vlm_factory, batch):
    model = vlm_factory()
    before = snapshot(model)
    with torch.no_grad():
        logits = model(**batch).logits
    with pytest.raises(pv.PeftVlmError, match="LoRA could not be applied.*nonexistent"):
        pv.apply(model, pv.AdaptionPromptConfig(length=2, layers=2), pv.BiasScaleConfig(),
                 peft.LoraConfig(r=2, target_modules=["nonexistent"]))
    assert_unchanged(model, before)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, logits)  # no hook, gate or wrapper of the refused call still runs
    # a retry is not "already applied"
    pv.apply(model, pv.AdaptionPromptConfig(length=2, layers=2), pv.BiasScaleConfig())
    assert pv.trainable_summary(model).trainable_parameters > 0


def test_apply_whose_method_refuses_while_attaching_rolls_back_the_ones_before(vlm_factory):
    model = pv.apply(vlm_factory(), pv.AdaptionPromptConfig(length=2, layers=2))
    before = snapshot(model)
    # the visual expert refuses once early fusion has taken the images out of the sequence: after attaching fusion
    with pytest.raises(pv.IncompatibleMethodsError, match="visual expert"):
        pv.apply(model, pv.EarlyFusionConfig(layers=1), pv.VisualExpertConfig(rank=2))
    assert_unchanged(model, before)
    assert model.images_in_sequence  # the flag early fusion set is back too


def test_conflicts_and_repeats_within_one_call_are_refused_before_any_change(vlm_factory, lm_factory, monkeypatch):
    from peft_vlm.methods.bias_scale import BiasScaleMethod

    attached = []
    monkeypatch.setattr(BiasScaleMethod, "attach", lambda self, *a: attached.append(self) or {})
    model = vlm_factory()
    with pytest.raises(pv.IncompatibleMethodsError, match="'lora' is already applied"):
        pv.apply(model, pv.BiasScaleConfig(), peft.LoraConfig(**LORA), peft.LoraConfig(**LORA))
    with pytest.raises(pv.IncompatibleMethodsError, match="needs a pv.VisionLanguageModel"):
        pv.apply(lm_factory(), pv.BiasScaleConfig(), pv.EarlyFusionConfig())
    assert attached == []  # refused before the first method was attached


def test_is_merged_names_the_merged_methods(vlm_factory):
    model = pv.apply(vlm_factory(), peft.LoraConfig(**LORA), pv.BiasScaleConfig())
    assert is_merged(model) == []
    pv.merge(model)
    assert is_merged(model) == ["lora", "bias_scale"]
    pv.unmerge(model)
    assert is_merged(model) == []


def test_merge_refused_by_one_method_merges_none(vlm_factory, batch):
    model = pv.apply(vlm_factory(), peft.LoraConfig(**LORA), pv.BiasScaleConfig())
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
        next(p for n, p in model.named_parameters() if n.endswith("scale"))[0] = 0.0  # bias/scale cannot merge
    before = snapshot(model)
    with pytest.raises(pv.NotMergeableError, match="zero scale"):
        pv.merge(model)
    assert_unchanged(model, before)  # LoRA, first in order, was not merged either: bitwise the same weights
    assert is_merged(model) == []


def test_save_after_merge_is_refused_naming_unmerge_then_saves_the_whole_adapter(vlm_factory, batch, tmp_path):
    model = pv.apply(vlm_factory(), peft.LoraConfig(**LORA), pv.BiasScaleConfig())
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(0.01 * torch.randn_like(parameter))
        expected = model(**batch).logits
    pv.merge(model)
    with pytest.raises(pv.AdapterFileError, match=r"lora, bias_scale are merged.*pv\.unmerge"):
        pv.save_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    pv.unmerge(model)
    path = pv.save_adapter(model, tmp_path / "adapter")
    with safe_open(str(path), framework="pt") as handle:
        assert set(handle.keys()) == {n for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        reloaded = pv.load_adapter(vlm_factory(), path)(**batch).logits
    assert torch.allclose(reloaded, expected, atol=1e-5)


def rewrite(path, target, tensors=None, **metadata):
    """A copy of adapter `path` at `target` with some tensors and metadata fields replaced (None: removed)."""
    with safe_open(str(path), framework="pt") as handle:
        raw, old = dict(handle.metadata()), {k: handle.get_tensor(k) for k in handle.keys()}
    old = old if tensors is None else tensors(old)
    for key, value in metadata.items():
        if value is None:
            raw.pop(key)
        else:
            raw[key] = value if isinstance(value, str) else json.dumps(value)
    save_file(old, str(target), metadata=raw)
    return target


REFUSED_LOADS = {
    "missing tensor": (lambda t: {k: v for k, v in t.items() if k != max(t)}, {}, "missing"),
    "extra tensor": (lambda t: {**t, "language_model.extra": torch.zeros(2)}, {}, "unexpected"),
    "wrong shape": (lambda t: {k: (v[:-1] if i == 0 else v) for i, (k, v) in enumerate(t.items())}, {}, "has shape"),
    "bad option": (None, {"methods": [{"method": "lora", "config": {"r": "four"}}]}, "r='four'"),
    "wrong base": (None, {"base": "{\"model_type\": \"llama\", \"num_hidden_layers\": 9}"}, "num_hidden_layers"),
}


@pytest.mark.parametrize("case", sorted(REFUSED_LOADS))
def test_a_refused_load_leaves_the_model_as_it_was_and_a_retry_works(case, vlm_factory, batch, tmp_path):
    trained = pv.apply(vlm_factory(), peft.LoraConfig(**LORA), pv.BiasScaleConfig())
    with torch.no_grad():
        for parameter in (p for p in trained.parameters() if p.requires_grad):
            parameter.add_(0.01 * torch.randn_like(parameter))
    good = pv.save_adapter(trained, tmp_path / "good")
    tensors, metadata, message = REFUSED_LOADS[case]
    # the groups field follows the tensors, so the file stays well-formed
    if case in ("missing tensor", "extra tensor"):
        with safe_open(str(good), framework="pt") as handle:
            groups = json.loads(handle.metadata()["groups"])
        names = set(tensors({k: torch.zeros(1) for k in groups}))
        metadata = {"groups": {k: groups.get(k, "lora/language") for k in names}}
    bad = rewrite(good, tmp_path / "bad.safetensors", tensors, **metadata)
    model = vlm_factory()
    before = snapshot(model)
    with pytest.raises(pv.PeftVlmError, match=message):
        pv.load_adapter(model, bad)
    assert_unchanged(model, before)
    pv.load_adapter(model, good)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, trained(**batch).logits)


def test_unmerge_that_fails_half_way_merges_back_what_it_had_unmerged(vlm_factory, batch, monkeypatch):
    from peft_vlm.methods.lora import LoraMethod

    model = pv.merge(pv.apply(vlm_factory(), peft.LoraConfig(**LORA), pv.BiasScaleConfig()))
    before = snapshot(model)
    with torch.no_grad():
        merged_logits = model(**batch).logits
    monkeypatch.setattr(LoraMethod, "unmerge", lambda self, model: (_ for _ in ()).throw(RuntimeError("disk on fire")))
    # bias/scale (unmerged first, in reverse order) merges again
    with pytest.raises(RuntimeError, match="disk on fire"):
        pv.unmerge(model)
    assert snapshot(model)["modules"] == before["modules"] and is_merged(model) == ["lora", "bias_scale"]
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, merged_logits, atol=1e-5)
