"""No pickle path from an adapter file or a recipe: every base path in an adapter's `base_model` (plain folders,
`transformers:` towers, open_clip `local-dir:` and `hf-hub:` names, vision_pretrained) is read as safetensors only,
a decoy `*.safetensors` beside pickled weights does not let them through, and `torch.load` is never reached; a value
of `base_model` that does not fit (dtype, vision_options) is one error naming it."""
import json
import pickle
import re
import sys
from pathlib import Path

import pytest
import torch

import peft_vlm as pv
from peft_vlm import recipes
from peft_vlm.cli import main as cli
from peft_vlm.model.vision_towers import build_vision_tower

sys.path.insert(0, str(Path(__file__).parent))
import test_adapter_schema as schema  # noqa: E402

Payload, rewrite = schema.Payload, schema.rewrite
adapter, lm_folder = schema.adapter, schema.lm_folder  # fixtures


@pytest.fixture
def torch_load_raises(monkeypatch):
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError(f"torch.load reached with {args[:1]}")

    monkeypatch.setattr(torch, "load", refuse)
    return calls


def pickled_folder(tmp_path, name, weights_name, *others) -> tuple[Path, Path]:
    """A folder with pickled weights (unpickling them writes a marker) and a decoy `decoy.safetensors` beside."""
    folder, marker = tmp_path / name, tmp_path / f"{name}-unpickled"
    folder.mkdir()
    (folder / weights_name).write_bytes(pickle.dumps({"state_dict": Payload(str(marker))}))
    (folder / "decoy.safetensors").write_bytes(b"")
    for other, text in others:
        (folder / other).write_text(text)
    return folder, marker


def refused(adapter_path, capsys, *needles) -> str:
    assert cli(["generate", str(adapter_path), "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(needle in err for needle in needles), err
    return err


def test_a_language_model_folder_with_a_decoy_safetensors_beside_pickled_weights_is_refused(
        adapter, lm_folder, tmp_path, capsys, torch_load_raises):
    folder, marker = pickled_folder(tmp_path, "lm-decoy", "pytorch_model.bin",
                                    ("config.json", (lm_folder / "config.json").read_text()))
    bad = rewrite(adapter, tmp_path / "bad.safetensors",
                  base_model={"language_model": str(folder), "vision": "embedded"})
    refused(bad, capsys, "lm-decoy' is not safetensors weights", "base_model")
    assert torch_load_raises == [] and not marker.exists()


def test_a_transformers_tower_folder_with_a_decoy_safetensors_beside_pickled_weights_is_refused(
        adapter, lm_folder, tmp_path, capsys, torch_load_raises):
    folder, marker = pickled_folder(tmp_path, "tower-decoy", "pytorch_model.bin", ("config.json", "{}"))
    bad = rewrite(adapter, tmp_path / "bad.safetensors",
                  base_model={"language_model": str(lm_folder), "vision": f"transformers:{folder}"})
    refused(bad, capsys, f"'transformers:{folder}' is not safetensors weights")
    assert torch_load_raises == [] and not marker.exists()


def test_an_open_clip_local_dir_with_a_decoy_safetensors_beside_pickled_weights_is_refused(
        adapter, lm_folder, tmp_path, capsys, torch_load_raises):
    # open_clip prefers open_clip_pytorch_model.bin to any safetensors file not named open_clip_model.safetensors
    folder, marker = pickled_folder(tmp_path, "clip-decoy", "open_clip_pytorch_model.bin",
                                    ("open_clip_config.json", json.dumps({"model_cfg": {}})))
    (folder / "model.safetensors").write_bytes(b"")
    bad = rewrite(adapter, tmp_path / "bad.safetensors",
                  base_model={"language_model": str(lm_folder), "vision": f"local-dir:{folder}"})
    refused(bad, capsys, f"'local-dir:{folder}' is not safetensors weights")
    assert torch_load_raises == [] and not marker.exists()


def test_an_open_clip_hub_repository_without_safetensors_weights_is_refused_before_open_clip_loads(
        monkeypatch, lm_folder, tmp_path, torch_load_raises):
    import open_clip

    monkeypatch.setattr(open_clip, "create_model_and_transforms",
                        lambda *a, **k: pytest.fail("open_clip would have fetched open_clip_pytorch_model.bin"))
    with pytest.raises(pv.ModelLoadError, match="'hf-hub:nobody/pickled-tower': no open_clip_model.safetensors"):
        pv.VisionLanguageModel.from_pretrained(str(lm_folder), vision="hf-hub:nobody/pickled-tower")
    assert torch_load_raises == []


@pytest.mark.parametrize("tag, fetched", [
    ({"hf_hub": "timm/tower.openai/"}, ("timm/tower.openai", "open_clip_model.safetensors")),
    ({"hf_hub": "org/tower/weights.pt"}, ("org/tower", "weights.safetensors")),
    ({"url": "https://example.com/tower.pt"}, None),
])
def test_an_open_clip_pretrained_tag_is_read_only_from_safetensors_hub_weights(
        monkeypatch, tiny_vit, tag, fetched, torch_load_raises):
    import huggingface_hub
    import open_clip
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []

    def missing(repo, file):
        calls.append((repo, file))
        raise LocalEntryNotFoundError("not in the cache")

    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda name, pretrained: tag)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", missing)
    monkeypatch.setattr(open_clip, "create_model_and_transforms", lambda *a, **k: pytest.fail("open_clip loaded"))
    message = f"no {fetched[1]} could be read from '{fetched[0]}'" if fetched else "only as a pickled download"
    with pytest.raises(pv.ModelLoadError, match=f"pretrained='some-tag'.*{message}"):
        build_vision_tower(tiny_vit, pretrained="some-tag")
    assert calls == ([fetched] if fetched else []) and torch_load_raises == []


def test_a_pickled_weights_file_passed_in_python_is_refused_before_open_clip_reads_it(tiny_vit, tmp_path,
                                                                                      torch_load_raises):
    weights = tmp_path / "tower.pt"
    weights.write_bytes(pickle.dumps({"state_dict": Payload(str(tmp_path / "unpickled"))}))
    with pytest.raises(pv.ModelLoadError, match="tower.pt' is not safetensors weights"):
        build_vision_tower(tiny_vit, pretrained=str(weights))
    assert torch_load_raises == [] and not (tmp_path / "unpickled").exists()


def test_a_recipe_naming_pickled_weights_is_refused_before_the_language_model_loads(tmp_path, monkeypatch):
    weights = tmp_path / "tower.pth"
    weights.write_bytes(b"pickle")
    from peft_vlm.model import vision_language_model

    monkeypatch.setattr(vision_language_model, "load_language_model", lambda *a, **k: pytest.fail("LM loaded"))
    with pytest.raises(pv.ModelLoadError, match="model section: '.*tower.pth' is not safetensors weights"):
        recipes.build_model({"language_model": "embedded", "vision": "embedded", "vision_pretrained": str(weights)})


def test_a_folder_holding_safetensors_and_pickled_weights_loads_the_safetensors_only(
        lm_folder, tiny_vit, tmp_path, torch_load_raises):
    marker = tmp_path / "unpickled"
    (lm_folder / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Payload(str(marker))}))
    model = pv.VisionLanguageModel.from_pretrained(str(lm_folder), vision=tiny_vit)
    assert model.language_model is not None and torch_load_raises == [] and not marker.exists()


@pytest.mark.parametrize("base_model, message", [
    ({"dtype": "float77"}, "dtype='float77' is not valid; dtype takes one of 'auto'"),
    ({"dtype": 3}, "dtype=3 is not valid"),
    ({"vision_options": {"feature_layer": "last"}}, "feature_layer='last' is not valid; feature_layer takes an int"),
    ({"vision_options": {"colour": "red"}}, "unknown option 'colour'; known: feature_layer"),
    ({"vision_options": {"name": "ViT-L-14"}}, "'name' is not an option here"),
    ({"vision_options": ["feature_layer"]}, "vision_options takes dict or null"),
])
def test_a_base_model_value_that_does_not_fit_is_one_error_naming_it(adapter, lm_folder, tmp_path, capsys,
                                                                     base_model, message):
    base = {"language_model": str(lm_folder), "vision": "embedded", **base_model}
    bad = rewrite(adapter, tmp_path / "bad.safetensors", base_model=base)
    err = refused(bad, capsys)
    assert "error:" in err and re.search(message, err), err


TINY_TIMM = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def test_a_pretrained_timm_tower_is_built_from_the_hubs_safetensors_file_only(monkeypatch, tmp_path,
                                                                              torch_load_raises):
    import huggingface_hub
    from safetensors.torch import save_file

    from peft_vlm.model.vision_towers import TimmVisionTower

    random_tower = TimmVisionTower("vit_small_patch14_dinov2", seed=1, **TINY_TIMM)
    weights = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in random_tower.model.state_dict().items()}, str(weights))
    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, file: calls.append((repo, file)) or
                        str(weights))
    tower = TimmVisionTower("vit_small_patch14_dinov2", pretrained=True, seed=2, **TINY_TIMM)
    assert calls == [("timm/vit_small_patch14_dinov2.lvd142m", "model.safetensors")] and torch_load_raises == []
    loaded, expected = tower.model.state_dict(), random_tower.model.state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in loaded)


@pytest.mark.parametrize("name, hub_id, message", [
    ("vit_small_patch14_dinov2", None, "timm has no hub weights for it"),
    ("vit_small_patch14_dinov2", "org/pickled-only", "no model.safetensors could be read from 'org/pickled-only'"),
    ("hf-hub:org/pickled-only", None, "no model.safetensors could be read from 'org/pickled-only'"),
])
def test_a_timm_tower_whose_weights_are_not_safetensors_is_refused_before_timm_loads(
        monkeypatch, name, hub_id, message, torch_load_raises):
    import huggingface_hub
    import timm
    from huggingface_hub.errors import EntryNotFoundError

    config = timm.models.get_pretrained_cfg("vit_small_patch14_dinov2")
    config.hf_hub_id = hub_id

    def missing(repo, file):
        raise EntryNotFoundError(f"{file} is not in {repo}")

    monkeypatch.setattr(timm.models, "get_pretrained_cfg", lambda name: config)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", missing)
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("timm would have looked for weights"))
    with pytest.raises(pv.ModelLoadError, match=f"'timm:{re.escape(name)}' \\(pretrained\\): {message}"):
        build_vision_tower(f"timm:{name}", pretrained=True, **TINY_TIMM)
    assert torch_load_raises == []
