"""LoRA in the vision tower on request (`pv.apply(model, peft.LoraConfig(...), target="vision")`): group `vision`,
identity at init, only its tensors train, saved and loaded, merged and unmerged, on every kind of tower."""
import peft
import pytest
import torch
from peft.tuners.lora import LoraLayer

import peft_vlm as pv
from conftest import make_lm, make_tokenizer, make_vlm, train_steps
from peft_vlm.methods.registry import config_from_entry
from peft_vlm.runtime.tracking import named_tracked_parameters
from tiny_transformers_vlms import BUILDERS, batch, pictures, save_tiny_tower, wrapped

TIMM = {"vision": "timm:vit_small_patch14_dinov2", "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2,
        "num_heads": 2}
# each tower's own module names: open_clip's MLP, timm's attention and MLP, transformers' q/v projections
BUILT_HERE = {"open_clip": ["c_fc", "c_proj"], "timm": ["qkv", "fc1"], "transformers": ["q_proj", "v_proj"]}
WRAPPED = {"llava": ["q_proj", "v_proj"], "llava_next": ["q_proj", "v_proj"], "qwen2_vl": ["qkv", "fc1"],
           "qwen2_5_vl": ["qkv", "gate_proj"], "idefics3": ["q_proj", "v_proj"], "paligemma": ["q_proj", "v_proj"],
           "gemma3": ["q_proj", "v_proj"]}
# The last layer, where the features are taken from the layer before it (the default feature layer -2 here, LLaVA's
# vision_feature_layer=-2): its LoRA gets no gradient. The other towers' features are their last layer's.
PAST_THE_FEATURES = {"open_clip": "resblocks.2.", "timm": "blocks.1.", "transformers": "layers.2.",
                     "llava": "layers.1.", "llava_next": "layers.1."}


def built(kind, tiny_vit, tmp_path):
    if kind == "open_clip":
        return make_vlm(make_tokenizer(), tiny_vit)
    if kind == "timm":
        return pv.VisionLanguageModel.from_pretrained(llm=make_lm(), tokenizer=make_tokenizer(),
                                                      vision=TIMM["vision"], vision_options={
                                                          k: v for k, v in TIMM.items() if k != "vision"}).eval()
    folder = tmp_path / "clip"
    if not folder.exists():
        save_tiny_tower("clip", folder)
    return pv.VisionLanguageModel.from_pretrained(llm=make_lm(), tokenizer=make_tokenizer(),
                                                  vision=f"transformers:{folder}").eval()


def vision_lora(targets):
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets)


def inputs_for(model):
    if hasattr(model, "family"):
        return batch(model)
    return model.tokenize(["What is in the picture?", "Is there a shape?"], images=pictures(2),
                          answers=["A red circle.", "Yes."])


def assert_vision_lora_behaves(model, targets, tmp_path, rebuild, unused=None):
    inputs = inputs_for(model)
    with torch.no_grad():
        before = model(**inputs).logits
    base_modules = [type(m) for m in model.vision_tower.modules()]
    pv.apply(model, vision_lora(targets), target="vision")
    tracked = named_tracked_parameters(model)  # a model built here trains its connector too
    lora = {name for name, (_, entry, group) in tracked.items() if entry.name == "vision_lora" and group == "vision"}
    tower_prefix = next(n for n, m in model.named_modules() if m is model.vision_tower) + "."
    assert lora and all(name.startswith(tower_prefix) and "lora_" in name for name in lora)
    assert all(name.startswith(tower_prefix) == (name in lora) for name in tracked)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)  # B = 0: identity at initialisation

    snapshot = {name: p.detach().clone() for name, p in model.named_parameters()}
    train_steps(model, inputs, 2, lr=5e-2)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, snapshot[name])}
    lora_b = {name for name in lora if "lora_B" in name}
    assert changed <= set(tracked)  # nothing but the methods' tensors moved
    still = lora_b - changed  # every LoRA B that reaches the patch tokens got a gradient
    assert len(still) < len(lora_b) and all(unused is not None and unused in name for name in still)

    with torch.no_grad():
        trained = model(**inputs).logits
    assert not torch.allclose(trained, before, atol=1e-4)
    pv.save_adapter(model, tmp_path / "adapter")
    loaded = pv.load_adapter(rebuild(), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, trained)

    pv.merge(model)
    assert [type(m) for m in model.vision_tower.modules()] == base_modules  # a merged tower runs its own modules
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, trained, atol=1e-5, rtol=1e-5)
    pv.unmerge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, trained, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", list(BUILT_HERE))
def test_vision_lora_on_a_tower_built_here(kind, tiny_vit, tmp_path):
    model = built(kind, tiny_vit, tmp_path)
    assert_vision_lora_behaves(model, BUILT_HERE[kind], tmp_path, lambda: built(kind, tiny_vit, tmp_path),
                               PAST_THE_FEATURES[kind])


@pytest.mark.parametrize("arch", list(WRAPPED))
def test_vision_lora_on_a_wrapped_models_tower(arch, tmp_path):
    assert_vision_lora_behaves(wrapped(arch), WRAPPED[arch], tmp_path, lambda: wrapped(arch),
                               PAST_THE_FEATURES.get(arch))


def test_language_and_vision_lora_compose_and_merge_together(tiny_vit, tmp_path):
    model = built("transformers", tiny_vit, tmp_path)
    pv.apply(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    pv.apply(model, vision_lora(["q_proj", "v_proj"]), target="vision")
    groups = {(entry.name, group) for _, entry, group in named_tracked_parameters(model).values()}
    assert groups == {("connector", "vision"), ("lora", "language"), ("vision_lora", "vision")}
    inputs = inputs_for(model)
    train_steps(model, inputs, 2, lr=5e-2)
    with torch.no_grad():
        trained = model(**inputs).logits
    pv.merge(model)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, trained, atol=1e-5, rtol=1e-5)


def test_lora_stays_out_of_the_vision_tower_unless_asked(tiny_vit, tmp_path):
    model = built("transformers", tiny_vit, tmp_path)
    pv.apply(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))  # names the tower's modules too
    assert not any(isinstance(m, LoraLayer) for m in model.vision_tower.modules())


def test_a_recipe_entry_names_vision_lora():
    config = config_from_entry({"method": "vision_lora", "r": 4, "target_modules": ["q_proj"]}, "recipe")
    model = pv.apply(wrapped("llava"), config)
    assert [n for n, _ in named_tracked_parameters(model).items()][0].startswith("model.model.vision_tower.")


def test_target_vision_takes_lora_configs_only():
    model = wrapped("llava")
    with pytest.raises(pv.ConfigError, match="target='vision': no method takes a BiasScaleConfig"):
        pv.apply(model, pv.BiasScaleConfig(), target="vision")
    with pytest.raises(pv.ConfigError, match="target='tower' is not a part"):
        pv.apply(model, vision_lora(["q_proj"]), target="tower")
    assert not named_tracked_parameters(model)


def test_vision_lora_needs_a_vision_language_model():
    with pytest.raises(pv.IncompatibleMethodsError, match="vision_lora"):
        pv.apply(make_lm(), vision_lora(["q_proj"]), target="vision")


def test_a_target_the_tower_lacks_is_a_clear_error():
    model = wrapped("llava")
    with pytest.raises(pv.PeftVlmError, match="could not be applied to the vision tower"):
        pv.apply(model, vision_lora(["no_such_module"]), target="vision")
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


def test_every_wrapped_architecture_is_covered():
    assert set(WRAPPED) == set(BUILDERS)
