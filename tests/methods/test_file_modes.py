"""Saved files (adapter, checkpoints, exported model, metrics) get the mode any other output gets: 0666 less the
umask, so 0644 under the usual umask and 0640 under 027 (safetensors alone would make them 0600)."""
import os
import stat
import sys
from pathlib import Path
from types import SimpleNamespace

import peft
import pytest

import peft_vlm as pv
from peft_vlm.recipes import write_metrics

sys.path.insert(0, str(Path(__file__).parents[1] / "training"))


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def modes(*paths) -> set[int]:
    files = [p for path in paths for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()]
    assert files
    return {stat.S_IMODE(p.stat().st_mode) for p in files}


def test_a_saved_adapter_is_readable_as_the_umask_allows(vlm_factory, tmp_path, umask):
    path = pv.save_adapter(pv.apply(vlm_factory(), peft.LoraConfig(r=2, target_modules=["q_proj"])), tmp_path / "a")
    assert modes(path) == {0o666 & ~umask}


def test_a_trainers_adapter_and_checkpoints_are_readable_as_the_umask_allows(vlm_factory, tmp_path, umask):
    from test_checkpoint_faults import train

    result, _ = train(vlm_factory, tmp_path, max_steps=2, checkpoint_every=1)
    assert modes(result.adapter_path, tmp_path / "checkpoints") == {0o666 & ~umask}


def test_an_exported_model_and_the_metrics_are_readable_as_the_umask_allows(tmp_path, umask):
    from tiny_transformers_vlms import wrapped

    model = pv.apply(wrapped("llava"), pv.BiasScaleConfig())
    folder = pv.export_transformers(model, tmp_path / "exported")
    metrics = write_metrics({"recipe": "r"}, tmp_path / "metrics.json", SimpleNamespace(answer_protocol=None))
    assert modes(Path(folder), metrics) == {0o666 & ~umask}
