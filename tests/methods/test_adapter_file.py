"""Adapter files: only what was trained, exact reload, refusal of a base the adapter does not fit."""
import json

import peft
import pytest
import torch
from safetensors import safe_open

import peft_vlm as pv
from peft_vlm.cli import main as cli

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def trained(model, batch, steps=3):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.fixture
def adapted(vlm_factory, images):
    model = pv.apply(vlm_factory(), peft.LoraConfig(**LORA))
    batch = model.tokenize(["What colour?", "Shape?"], images[:2], answers=["red", "circle"])
    return trained(model, batch), batch


def test_save_then_load_onto_a_fresh_base_reproduces_logits_exactly(adapted, vlm_factory, tmp_path):
    model, batch = adapted
    pv.save_adapter(model, tmp_path / "adapter")
    fresh = pv.load_adapter(vlm_factory(), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, model(**batch).logits)


def test_file_holds_only_trained_tensors_and_is_about_their_size(adapted, tmp_path):
    model, _ = adapted
    path = pv.save_adapter(model, tmp_path / "adapter")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with safe_open(str(path), framework="pt") as handle:
        assert set(handle.keys()) == set(trainable)
        metadata = handle.metadata()
    payload = sum(p.numel() * p.element_size() for p in trainable.values())
    assert payload < path.stat().st_size <= 1.1 * payload + 8192
    assert [m["method"] for m in json.loads(metadata["methods"])] == ["lora"]
    assert json.loads(metadata["base"])["model_type"] == "llama"
    assert metadata["peft_vlm_version"] == pv.__version__


def test_loading_onto_a_base_with_another_config_names_the_difference(adapted, vlm_factory, tmp_path):
    model, _ = adapted
    pv.save_adapter(model, tmp_path / "adapter")
    with pytest.raises(pv.AdapterMismatchError, match="num_hidden_layers: adapter has 2, model has 3"):
        pv.load_adapter(vlm_factory(num_hidden_layers=3), tmp_path / "adapter")


def test_loading_onto_a_base_with_other_weights_is_refused(adapted, vlm_factory, tmp_path):
    model, _ = adapted
    pv.save_adapter(model, tmp_path / "adapter")
    with pytest.raises(pv.AdapterMismatchError, match="different weights"):
        pv.load_adapter(vlm_factory(seed=7), tmp_path / "adapter")


def test_loading_onto_another_model_type_is_refused(adapted, vlm_factory, tmp_path):
    model, _ = adapted
    pv.save_adapter(model, tmp_path / "adapter")
    with pytest.raises(pv.AdapterMismatchError, match="model_type: adapter has 'llama', model has 'qwen2'"):
        pv.load_adapter(vlm_factory("qwen2"), tmp_path / "adapter")


def test_bare_language_model_round_trip(lm_factory, tmp_path):
    model = pv.apply(lm_factory(), peft.LoraConfig(**LORA))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    pv.save_adapter(model, tmp_path / "lm-adapter.safetensors")
    fresh = pv.load_adapter(lm_factory(), tmp_path / "lm-adapter.safetensors")
    ids = torch.randint(0, 300, (2, 7))
    assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_missing_or_foreign_files_give_clear_errors(lm_factory, tmp_path):
    with pytest.raises(pv.AdapterFileError, match="no adapter file at"):
        pv.load_adapter(lm_factory(), tmp_path / "nowhere")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(pv.AdapterFileError, match="junk.safetensors' is not a readable safetensors file"):
        pv.load_adapter(lm_factory(), tmp_path / "junk.safetensors")


def test_save_without_methods_is_refused(lm_factory, tmp_path):
    with pytest.raises(pv.AdapterFileError, match="no methods applied"):
        pv.save_adapter(lm_factory(), tmp_path / "a")


def test_info_command_prints_methods_counts_size_and_base(adapted, tmp_path, capsys):
    model, _ = adapted
    path = pv.save_adapter(model, tmp_path / "adapter")
    assert cli(["info", str(tmp_path / "adapter")]) == 0
    out = capsys.readouterr().out
    lora_count = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    lines = {line.split()[0]: line.split()[-1] for line in out.splitlines() if line.startswith("  ")}
    assert lines["lora/language"] == f"{lora_count:,}"
    assert f"{path.stat().st_size:,} bytes" in out
    assert "model_type=llama" in out and "- lora:" in out


def test_info_command_on_a_bad_path_is_one_line_not_a_traceback(tmp_path, capsys):
    assert cli(["info", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peft-vlm info: error: no adapter file at") and "Traceback" not in err
