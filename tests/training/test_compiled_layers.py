"""Decoder layers compiled for a training run: the same losses, compiled code in the steps but not in callbacks,
and the layers eager again afterwards."""
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState

import peft_vlm as pv
from peft_vlm.data import Collator, SampleDataset, SampleEncoder
from peft_vlm.errors import ConfigError

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
from train_tiny import samples  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def run(vlm_factory, output, compile_layers):
    """Four steps of V1-style adaption prompts; (losses, whether each MLP call was compiled: in the steps, in the
    callback's forward), and the model."""
    model = pv.apply(vlm_factory(), pv.AdaptionPromptConfig(length=4, layers=2))
    encoder = SampleEncoder.for_model(model)
    data = SampleDataset(samples("instruction", 8), encoder)
    traced = {"steps": [], "callback": []}
    where = ["steps"]

    def callback(trainer, step):
        where[0] = "callback"
        with torch.no_grad():
            trainer.unwrapped(**Collator.for_model(model)([data[0]]))
        where[0] = "steps"

    mlp = model.language_model.model.layers[0].mlp
    mlp.register_forward_pre_hook(lambda module, args: traced[where[0]].append(torch.compiler.is_compiling()))
    config = pv.TrainConfig(output_dir=str(output), max_steps=4, batch_size=2, learning_rate=1e-2, report_to=None,
                            progress_bar=False, checkpoint_every=0, mixed_precision="no", compile_layers=compile_layers)
    result = pv.JointTrainer(model, config, data=data, callbacks=[callback]).train()
    return [h["loss"] for h in result.history], traced, model


def test_same_losses_compiled_in_the_steps_only_and_eager_afterwards(vlm_factory, tmp_path):
    losses, traced, model = run(vlm_factory, tmp_path / "compiled", True)
    reference, reference_traced, _ = run(vlm_factory, tmp_path / "eager", False)
    assert losses == pytest.approx(reference, rel=1e-4)
    assert any(traced["steps"]) and not any(reference_traced["steps"])
    assert traced["callback"] and not any(traced["callback"])  # the curve's evaluation does not compile
    layers = model.language_model.model.layers
    assert all("forward" not in vars(layer) for layer in layers)  # the class's forward again


def test_refused_with_sharded_parameters():
    with pytest.raises(ConfigError, match="compile_layers"):
        pv.TrainConfig(compile_layers=True, sharding="fsdp2")
