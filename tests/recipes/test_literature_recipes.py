"""The recipes of the Flamingo, BLIP-2 and Prismatic setups run a few steps on tiny models through the command line."""
from pathlib import Path

import pytest

import peft_vlm as pv
from peft_vlm.cli import main as cli
from test_recipes import tiny_files, tiny_overrides  # noqa: F401 (tiny_files is a fixture)

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
TINY_DINO = ('{vision: "timm:vit_small_patch14_dinov2", img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, '
             'num_heads: 2}')
RUNS = {
    "flamingo_resampler": ([], ["gated_cross_attention", "connector"]),
    "blip2_qformer": ([], ["connector"]),
    "prismatic_fused": (["model.vision=[VIT, %s]" % TINY_DINO, "methods.0.r=2"], ["lora", "connector"]),
}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_literature_recipe_trains_a_few_steps_and_writes_an_adapter(name, tiny_files, tiny_vit, capsys):  # noqa: F811
    extra, trained = RUNS[name]
    overrides = ["eval.limit=2", "train.max_steps=2", *(item.replace("VIT", tiny_vit) for item in extra)]
    assert cli(["train", str(RECIPES / f"{name}.yaml"), "--max-steps", "2",
                *tiny_overrides(tiny_files, tiny_vit, *overrides)]) == 0
    out = capsys.readouterr().out
    assert all(method in out for method in trained) and "trainable parameters" in out
    metadata, tensors = pv.methods.adapter_file.read_adapter(tiny_files / "out" / "adapter.safetensors")
    assert tensors and {owner.split("/")[0] for owner in metadata["groups"].values()} == set(trained)
