"""bf16 autocast in JointTrainer, exercised with CPU autocast (the GPU default is `mixed_precision="auto"` -> bf16)."""
import sys
from pathlib import Path

import peft
import pytest
import torch
from accelerate.state import AcceleratorState
from PIL import Image
from safetensors.torch import load_file

import peft_vlm as pv
from peft_vlm.data import SampleDataset, SampleEncoder

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
from train_tiny import samples  # noqa: E402


@pytest.fixture
def fresh_accelerator_state():
    """Accelerate keeps one process-wide state; start and leave it clean so other tests get fp32 again."""
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def train(vlm_factory, output, mixed_precision):
    model = pv.apply(vlm_factory(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    encoder = SampleEncoder.for_model(model)
    config = pv.TrainConfig(output_dir=str(output), max_steps=4, batch_size=2, learning_rate=1e-2, report_to=None,
                            progress_bar=False, checkpoint_every=0, mixed_precision=mixed_precision)
    trainer = pv.JointTrainer(model, config, caption_data=SampleDataset(samples("caption", 8), encoder),
                              instruction_data=SampleDataset(samples("instruction", 8), encoder))
    projection_dtypes = []
    hook = model.language_model.model.layers[0].mlp.up_proj.register_forward_hook(
        lambda module, args, out: projection_dtypes.append(out.dtype))
    result = trainer.train()
    hook.remove()
    AcceleratorState._reset_state(True)
    return model, result, set(projection_dtypes)


def test_bf16_autocast_computes_in_bf16_and_keeps_fp32_trained_weights(vlm_factory, tmp_path, fresh_accelerator_state):
    model, result, dtypes = train(vlm_factory, tmp_path / "bf16", "bf16")
    _, reference, reference_dtypes = train(vlm_factory, tmp_path / "fp32", "no")
    assert dtypes == {torch.bfloat16} and reference_dtypes == {torch.float32}
    trained = {name: p for name, (p, _, _) in pv.runtime.tracking.named_tracked_parameters(model).items()}
    assert all(p.dtype == torch.float32 for p in trained.values())
    written = load_file(str(result.adapter_path))
    assert written and all(t.dtype == torch.float32 for t in written.values())
    losses = [h["loss"] for h in result.history]
    reference_losses = [h["loss"] for h in reference.history]
    assert result.skipped_steps == 0 and all(torch.isfinite(torch.tensor(losses)))
    assert losses != reference_losses  # bf16 really ran
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_losses), rtol=0, atol=0.01)


def test_runs_of_different_precision_follow_each_other_in_one_process(vlm_factory, images, tmp_path):
    """Two recipes in a row (or a benchmark comparing runs) in one process: the second precision is not refused."""
    from peft_vlm.data import SampleDataset, SampleEncoder

    for index, precision in enumerate(("no", "bf16", "no")):
        model = pv.apply(vlm_factory(), pv.BiasScaleConfig())
        samples = [{"messages": [{"role": "user", "content": "<image> colour?"},
                                 {"role": "assistant", "content": "red"}],
                    "images": [images[0]]}] * 2
        config = pv.TrainConfig(output_dir=str(tmp_path / str(index)), max_steps=1, batch_size=2, report_to=None,
                                progress_bar=False, mixed_precision=precision, checkpoint_every=0)
        trainer = pv.JointTrainer(model, config, data=SampleDataset(samples, SampleEncoder.for_model(model)))
        assert trainer.train().adapter_path.is_file()
        assert trainer.accelerator.mixed_precision == precision


@pytest.mark.parametrize("native", [True, False])
def test_bf16_native_trains_in_bf16_only_where_the_cpu_has_bf16_kernels(vlm_factory, tmp_path, monkeypatch,
                                                                        fresh_accelerator_state, native):
    """`bf16-native`: bf16 autocast on a CPU whose oneDNN computes bf16 (AVX-512, AMX), fp32 on an AVX2-only CPU, where
    bf16 is emulated; frozen_linears_in_bf16 then holds nothing in bf16."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    model = pv.apply(vlm_factory(), pv.BiasScaleConfig())
    frozen = model.language_model.model.layers[0].mlp.up_proj.weight
    samples = [{"messages": [{"role": "user", "content": "<image> colour?"}, {"role": "assistant", "content": "red"}],
                "images": [Image.new("RGB", (32, 32), "red")]}] * 2
    config = pv.TrainConfig(output_dir=str(tmp_path), max_steps=1, batch_size=2, report_to=None, progress_bar=False,
                            mixed_precision="bf16-native", frozen_linears_in_bf16=True, checkpoint_every=0)
    trainer = pv.JointTrainer(model, config, data=SampleDataset(samples, SampleEncoder.for_model(model)))
    dtypes = []
    hook = model.language_model.model.layers[0].mlp.up_proj.register_forward_hook(
        lambda module, args, out: dtypes.append(module.weight.dtype))
    trainer.train()
    hook.remove()
    expected = torch.bfloat16 if native else torch.float32
    assert trainer.accelerator.mixed_precision == ("bf16" if native else "no")
    assert set(dtypes) == {expected}  # the frozen weight while training
    assert frozen.dtype == torch.float32  # given back in full precision after the run


def test_bf16_on_a_cpu_without_bf16_kernels_warns_and_names_bf16_native(vlm_factory, tmp_path, monkeypatch,
                                                                        fresh_accelerator_state):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    model = pv.apply(vlm_factory(), pv.BiasScaleConfig())
    config = pv.TrainConfig(output_dir=str(tmp_path), max_steps=1, report_to=None, progress_bar=False,
                            mixed_precision="bf16")
    with pytest.warns(UserWarning, match="bf16-native"):
        pv.JointTrainer(model, config, data=[])
