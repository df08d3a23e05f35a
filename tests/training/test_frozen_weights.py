"""Frozen linear weights held in bf16 while training under bf16 autocast: the same losses, the fp32 weights back."""
import sys
from pathlib import Path

import peft
import pytest
import torch
from accelerate.state import AcceleratorState

import peft_vlm as pv
from peft_vlm.data import SampleDataset, SampleEncoder
from peft_vlm.errors import ConfigError
from peft_vlm.training.frozen_weights import frozen_linear_weights_in

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
from train_tiny import samples  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def v2_model(vlm_factory):
    model = vlm_factory(tie_word_embeddings=True)
    return pv.apply(model, pv.BiasScaleConfig(norms=True), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))


def train(model, output, frozen_linears_in_bf16):
    encoder = SampleEncoder.for_model(model)
    config = pv.TrainConfig(output_dir=str(output), max_steps=4, batch_size=2, learning_rate=1e-2, report_to=None,
                            progress_bar=False, checkpoint_every=0, mixed_precision="bf16",
                            frozen_linears_in_bf16=frozen_linears_in_bf16)
    trainer = pv.JointTrainer(model, config, caption_data=SampleDataset(samples("caption", 8), encoder),
                              instruction_data=SampleDataset(samples("instruction", 8), encoder))
    weight_dtypes = []
    projection = model.language_model.model.layers[0].mlp.up_proj
    hook = projection.register_forward_pre_hook(lambda module, args: weight_dtypes.append(module.weight.dtype))
    result = trainer.train()
    hook.remove()
    return result, set(weight_dtypes)


def test_losses_equal_autocast_and_fp32_weights_come_back(vlm_factory, tmp_path):
    model = v2_model(vlm_factory)
    before = {name: p for name, p in model.named_parameters()}
    result, dtypes = train(model, tmp_path / "bf16_weights", True)
    reference, reference_dtypes = train(v2_model(vlm_factory), tmp_path / "reference", False)
    assert dtypes == {torch.bfloat16} and reference_dtypes == {torch.float32}
    assert [h["loss"] for h in result.history] == [h["loss"] for h in reference.history]
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert all(p.dtype == torch.float32 for p in after.values())
    lm = model.language_model
    assert lm.lm_head.weight is lm.get_input_embeddings().weight  # the tie is back


def test_only_frozen_fp32_linears_change_and_an_error_restores_them(vlm_factory):
    model = v2_model(vlm_factory)
    lm = model.language_model
    embedding, norm = lm.get_input_embeddings().weight, lm.model.layers[0].input_layernorm.weight
    with pytest.raises(RuntimeError, match="stopped"):
        with frozen_linear_weights_in(model, torch.bfloat16) as count:
            assert count > 0
            attention = lm.model.layers[0].self_attn
            assert attention.q_proj.base_layer.weight.dtype == torch.bfloat16
            assert attention.q_proj.lora_A["default"].weight.dtype == torch.float32  # trained: the fp32 master
            assert lm.lm_head.weight.dtype == torch.bfloat16 and embedding.dtype == torch.float32
            assert norm.dtype == torch.float32 and norm.requires_grad
            raise RuntimeError("stopped")
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_refused_without_bf16_autocast():
    with pytest.raises(ConfigError, match="frozen_linears_in_bf16"):
        pv.TrainConfig(frozen_linears_in_bf16=True, mixed_precision="no")
