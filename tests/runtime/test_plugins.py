"""The method registry: composition, refusals, presets, third-party methods through entry points, meta device."""
import subprocess
import sys
import textwrap

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import peft_vlm as pv

LLAMA_7B = dict(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, vocab_size=32000,
)


def test_apply_returns_the_model_and_freezes_everything_but_the_method(lm_factory):
    model = lm_factory()
    assert pv.apply(model, peft.LoraConfig(r=2, target_modules=["q_proj"])) is model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_applying_the_same_method_twice_is_refused(lm_factory):
    model = pv.apply(lm_factory(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(pv.IncompatibleMethodsError, match="'lora' is already applied"):
        pv.apply(model, peft.LoraConfig(r=2, target_modules=["v_proj"]))


def test_unknown_method_name_lists_what_exists(lm_factory):
    with pytest.raises(pv.UnknownMethodError, match="unknown method or preset 'dora'.*lora"):
        pv.apply(lm_factory(), "dora")


def test_unknown_config_type_is_refused():
    with pytest.raises(pv.UnknownMethodError, match="no method accepts a config of type IA3Config"):
        pv.methods.registry.method_for_config(peft.IA3Config())


def test_preset_by_name_applies_its_methods(lm_factory):
    model = pv.apply(lm_factory(), "lora")
    assert [row.method for row in pv.trainable_summary(model).rows] == ["lora"]
    assert "lora" in pv.available_presets()


def test_lora_targets_missing_from_the_model_give_a_clear_error(lm_factory):
    with pytest.raises(pv.PeftVlmError, match="LoRA could not be applied.*nonexistent"):
        pv.apply(lm_factory(), peft.LoraConfig(r=2, target_modules=["nonexistent"]))


def test_apply_works_on_the_meta_device_for_a_7b_configuration():
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA_7B))
    pv.apply(model, peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    summary = pv.trainable_summary(model)
    assert summary.trainable_parameters == 32 * 2 * 8 * (4096 + 4096)  # 4,194,304
    assert summary.base_parameters == 6_738_415_616  # LLaMA-7B
    assert all(p.is_meta for p in model.parameters())


def test_trainable_summary_lists_method_group_and_share(vlm_factory):
    model = pv.apply(vlm_factory(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    summary = pv.trainable_summary(model)
    assert [(r.method, r.group) for r in summary.rows] == [("connector", "vision"), ("lora", "language")]
    assert summary.trainable_parameters == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert summary.base_parameters == sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert "lora" in str(summary) and "% of base" in str(summary)


EXTERNAL_METHOD = '''
from dataclasses import dataclass
import torch
import peft_vlm as pv


@dataclass
class OutputOffsetConfig:
    size: int = 0


class OutputOffsetMethod(pv.Method):
    """Adds a trainable offset (zero at start) to the final hidden state."""
    name = "output_offset"
    config_class = OutputOffsetConfig

    def attach(self, model, language_model):
        norm = language_model.model.norm
        norm.offset = torch.nn.Parameter(torch.zeros(norm.weight.shape[0]))
        norm.register_forward_hook(lambda module, args, output: output + module.offset)
        return {"language": [norm.offset]}
'''


def test_a_third_party_method_installed_with_an_entry_point_is_found_and_applied(lm_factory, tmp_path):
    package = tmp_path / "src"
    (package / "output_offset").mkdir(parents=True)
    (package / "output_offset" / "__init__.py").write_text(EXTERNAL_METHOD)
    (package / "pyproject.toml").write_text(textwrap.dedent('''
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "output-offset"
        version = "0.1"
        [project.entry-points."peft_vlm.methods"]
        output_offset = "output_offset:OutputOffsetMethod"
    '''))
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target),
         str(package)],
        check=True,
    )
    sys.path.insert(0, str(target))
    try:
        assert "output_offset" in pv.available_methods()
        model = lm_factory()
        ids = torch.randint(0, 300, (1, 6))
        before = model(ids).logits
        pv.apply(model, "output_offset")
        assert torch.equal(model(ids).logits, before)
        assert [n for n, p in model.named_parameters() if p.requires_grad] == ["model.norm.offset"]
    finally:
        sys.path.remove(str(target))
