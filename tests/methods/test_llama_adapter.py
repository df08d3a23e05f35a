"""The LLaMA-Adapter family together: exact identity at init, presets, parameter groups, save/load, merge."""
import pytest
import torch

import peft_vlm as pv
from peft_vlm.methods.bias_scale import BiasScale
from peft_vlm.methods.presets import load_preset, preset_card
from peft_vlm.runtime.tracking import state_of

PRESETS = ["llama-adapter-v1", "llama-adapter-v1-multimodal", "llama-adapter-v2", "llama-adapter-v2-official"]


def _all_methods():
    return (pv.AdaptionPromptConfig(length=4, layers=1, multimodal=True), pv.BiasScaleConfig(),
            pv.EarlyFusionConfig(layers=1), pv.VisualQueryPromptConfig(width=16, depth=1, heads=2))


def _open(model, seed=0):
    """Non-zero gates, biases and scales: every method now changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".gate"):
                parameter.fill_(0.5)
        for module in model.modules():
            if isinstance(module, BiasScale):
                module.bias.normal_(0, 0.05, generator=generator)
                module.scale.uniform_(0.8, 1.2, generator=generator)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_all_methods_together_leave_logits_unchanged_at_init(vlm_factory, images, implementation):
    model = vlm_factory("qwen2")
    model.language_model.config._attn_implementation = implementation
    batches = [model.tokenize(["Shape?", "Colour?"], [images[0], None]), model.tokenize(["Shape?"])]  # images, text
    with torch.no_grad():
        before = [model(**batch).logits for batch in batches]
        pv.apply(model, *_all_methods())
        after = [model(**batch).logits for batch in batches]
    assert [(a - b).abs().max().item() for a, b in zip(after, before)] == [0, 0]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_are_available_by_name_with_a_card(name):
    assert name in pv.available_presets()
    assert load_preset(name) and preset_card(name).startswith(f"# {name}")


def test_v2_preset_applies_by_name_and_splits_vision_from_language(vlm_factory):
    model = pv.apply(vlm_factory(), "llama-adapter-v2")
    assert state_of(model).names() == ["connector", "adaption_prompt", "bias_scale", "early_fusion"]
    groups = {name: group for name, (_, _, group) in pv.runtime.tracking.named_tracked_parameters(model).items()}
    vision = {name for name, group in groups.items() if group == "vision"}
    assert vision == {n for n in groups if n.startswith("connector.") or ".early_fusion." in n}
    assert any(".early_fusion." in n for n in vision)
    assert all(".adaption_prompt." in n or ".bias_scale." in n or "norm" in n for n in set(groups) - vision)


def test_save_then_load_after_training_reproduces_logits_exactly(vlm_factory, images, tmp_path):
    model = pv.apply(vlm_factory(), *_all_methods())
    _open(model)
    batch = model.tokenize(["What is in the picture?", "Colour?"], [images[0], None], answers=["a circle", "red"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    model.eval()
    pv.save_adapter(model, tmp_path / "adapter")
    reloaded = pv.load_adapter(vlm_factory(), tmp_path / "adapter")
    with torch.no_grad():
        expected, got = model(**batch).logits, reloaded(**batch).logits
        untrained = pv.apply(vlm_factory(), *_all_methods())(**batch).logits
    assert (expected - untrained).abs().max() > 1e-3
    assert torch.equal(got, expected)


def test_merge_folds_bias_scale_and_generates_the_same_tokens(vlm_factory, images):
    model = pv.apply(vlm_factory(), "llama-adapter-v2")
    _open(model)
    batch = model.tokenize(["What is in the picture?", "Colour?"], [images[0], None])
    before = model.generate_ids(**batch, max_new_tokens=6, min_new_tokens=6)
    pv.merge(model)
    assert not any(isinstance(m, BiasScale) for m in model.modules())
    assert model.generate_ids(**batch, max_new_tokens=6, min_new_tokens=6).tolist() == before.tolist()
