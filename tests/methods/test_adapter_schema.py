"""Adapter files are checked field by field on read: a malformed field is an AdapterFileError naming it, from the
Python API and from every command that reads adapters; odd tensors are refused by name; no path from a file reaches
a pickle loader."""
import json
import pickle
import re

import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import peft_vlm as pv
from peft_vlm.cli import main as cli


@pytest.fixture
def adapter(vlm_factory, tmp_path):
    return pv.save_adapter(pv.apply(vlm_factory(), peft.LoraConfig(r=4, target_modules=["q_proj"])), tmp_path / "good")


def rewrite(path, target, tensors=None, **fields):
    """A copy of adapter `path` at `target`, some tensors and metadata fields replaced (a field set to None: removed;
    a str: stored as it is; anything else: stored as JSON)."""
    with safe_open(str(path), framework="pt") as handle:
        raw, old = dict(handle.metadata()), {k: handle.get_tensor(k) for k in handle.keys()}
    for key, value in fields.items():
        if value is None:
            raw.pop(key)
        else:
            raw[key] = value if isinstance(value, str) else json.dumps(value)
    save_file(tensors(old) if tensors else old, str(target), metadata=raw)
    return target


MALFORMED = {
    "methods not JSON": ("methods", "[{", "field 'methods' is not valid JSON"),
    "methods not a list": ("methods", {"method": "lora"}, "field 'methods' must be a JSON list"),
    "method entry a string": ("methods", ["lora"], "field 'methods' entry #1 must be"),
    "method entry without config": ("methods", [{"method": "lora"}], "field 'methods' entry #1 must be"),
    "config not a mapping": ("methods", [{"method": "lora", "config": [4]}], "field 'methods' entry #1 must be"),
    "method name not a string": ("methods", [{"method": 3, "config": {}}], "field 'methods' entry #1 must be"),
    "option of the wrong type": ("methods", [{"method": "lora", "config": {"r": "four"}}],
                                 r"field 'methods' entry #1 \(lora\): r='four' is not valid; r takes an integer"),
    "unknown option": ("methods", [{"method": "lora", "config": {"rank": 4}}],
                       r"entry #1 \(lora\): unknown option\(s\) rank"),
    "an int for a bool option": ("methods", [{"method": "bias_scale", "config": {"norms": 1}}],
                                 r"norms=1 is not valid"),
    "base missing": ("base", None, "field 'base' is missing"),
    "base not a mapping": ("base", [1], "field 'base' must be a JSON object"),
    "base value of the wrong type": ("base", {"num_hidden_layers": "2"}, "field 'base' has num_hidden_layers='2'"),
    "base value a bool": ("base", {"hidden_size": True}, "field 'base' has hidden_size=True"),
    "groups missing": ("groups", None, "field 'groups' is missing"),
    "groups not naming the tensors": ("groups", {"x": "lora/language"},
                                      "field 'groups' does not name the file's tensors"),
    "groups owner malformed": ("groups", "{\"a\": 1}", "field 'groups' must map each tensor"),
    "version missing": ("peft_vlm_version", None, "field 'peft_vlm_version' is missing"),
    "base_model not JSON": ("base_model", "{", "field 'base_model' is not valid JSON"),
    "base_model not a mapping": ("base_model", ["embedded"], "field 'base_model' must be a JSON object"),
    "another format": ("format", "other/1", "is not a peft_vlm adapter file"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_each_malformed_metadata_field_is_an_adapter_file_error_naming_it(case, adapter, lm_factory, tmp_path, capsys):
    field, value, message = MALFORMED[case]
    bad = rewrite(adapter, tmp_path / "bad.safetensors", **{field: value})
    with pytest.raises(pv.AdapterFileError, match=message):
        pv.load_adapter(lm_factory(), bad)
    assert cli(["info", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("peft-vlm info: error:") and "Traceback" not in err


@pytest.mark.parametrize("command", [["generate", "--prompt", "Hi"], ["eval", "--limit", "1"], ["info"]])
@pytest.mark.parametrize("case", ["methods not a list", "base missing", "option of the wrong type"])
def test_commands_end_in_one_line_and_a_nonzero_exit_on_malformed_adapters(command, case, adapter, tmp_path, capsys):
    field, value, message = MALFORMED[case]
    bad = rewrite(adapter, tmp_path / "bad.safetensors", **{field: value})
    assert cli([command[0], str(bad), *command[1:]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"field '{field}'" in err


def test_an_unknown_method_names_the_file_and_the_method(adapter, lm_factory, tmp_path):
    bad = rewrite(adapter, tmp_path / "bad.safetensors", methods=[{"method": "dora", "config": {}}])
    with pytest.raises(
        pv.UnknownMethodError, match=r"bad.safetensors': metadata field 'methods' entry #1: unknown method 'dora'"
    ):
        pv.load_adapter(lm_factory(), bad)


@pytest.mark.parametrize("kind, change, message", [
    ("integers", lambda t: t.round().to(torch.int64), "has dtype int64; adapter tensors are float16"),
    ("booleans", lambda t: t > 0, "has dtype bool"),
    ("NaN", lambda t: t.index_fill(0, torch.tensor([0]), float("nan")), "holds NaN or infinite values"),
    ("inf", lambda t: t.index_fill(0, torch.tensor([0]), float("inf")), "holds NaN or infinite values"),
])
def test_tensors_of_a_dtype_that_does_not_fit_or_not_finite_are_refused_by_name(kind, change, message, adapter,
                                                                                  vlm_factory, tmp_path):
    with safe_open(str(adapter), framework="pt") as handle:
        name = sorted(handle.keys())[0]
    bad = rewrite(adapter, tmp_path / "bad.safetensors", tensors=lambda t: {**t, name: change(t[name])})
    model = vlm_factory()
    with pytest.raises(pv.AdapterFileError, match=f"tensor '{name}' {message}"):
        pv.load_adapter(model, bad)
    assert not any(p.requires_grad for p in model.language_model.parameters())  # nothing applied


class Payload:
    """Unpickling this writes a marker file: proof that something unpickled the weights."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def lm_folder(tmp_path, lm_factory, tokenizer):
    folder = tmp_path / "lm"
    lm_factory().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def pickle_adapter(adapter, tmp_path, tiny_vit, lm_folder):
    """An adapter whose base description names a pickled tower checkpoint that would run code when unpickled."""
    marker, weights = tmp_path / "unpickled", tmp_path / "tower.pt"
    weights.write_bytes(pickle.dumps({"state_dict": Payload(str(marker))}))
    base = {"language_model": str(lm_folder), "vision": tiny_vit, "vision_pretrained": str(weights),
            "connector": "mlp2x_gelu", "load_in_4bit": False}
    return rewrite(adapter, tmp_path / "bad.safetensors", base_model=base), marker


def test_an_adapter_naming_a_pickle_file_is_refused_without_any_unpickling(pickle_adapter, monkeypatch, capsys):
    path, marker = pickle_adapter
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or (_ for _ in ()).throw(RuntimeError("loaded")))
    for command in (["generate", str(path), "--prompt", "Hi"], ["eval", str(path), "--limit", "1"]):
        assert cli(command) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "tower.pt' is not safetensors weights" in err and "base_model" in err
    assert loads == [] and not marker.exists()
    # the same file without the check would have reached torch.load: the refusal above is what stopped it
    monkeypatch.setattr("peft_vlm.model.weights_files.refuse_pickle_weights", lambda *a: None)
    assert cli(["generate", str(path), "--prompt", "Hi"]) == 2
    assert loads and str(loads[0][0]).endswith("tower.pt")


@pytest.mark.parametrize("base_model, message", [
    ({"language_model": "embedded", "vision": "embedded", "vision_options": {"checkpoint_path": "weights.pth"}},
     "weights.pth"),
    ({"language_model": "LM_FOLDER_PICKLED", "vision": "embedded"}, "lm-pickled"),
])
def test_pickled_weights_named_anywhere_in_the_base_description_are_refused(base_model, message, adapter, lm_folder,
                                                                            tmp_path, capsys):
    pickled = tmp_path / "lm-pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((lm_folder / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"pickle")
    base_model = {k: (str(pickled) if v == "LM_FOLDER_PICKLED" else v) for k, v in base_model.items()}
    bad = rewrite(adapter, tmp_path / "bad.safetensors", base_model=base_model)
    assert cli(["generate", str(bad), "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err
    assert "is not safetensors weights" in err and message in err


def test_a_base_description_with_an_unknown_or_mistyped_option_names_the_field(adapter, tmp_path, capsys):
    for base_model, message in [({"visoin": "embedded"}, r"unknown option\(s\) visoin"),
                                ({"load_in_4bit": "yes"}, "load_in_4bit='yes' is not valid")]:
        bad = rewrite(adapter, tmp_path / "bad.safetensors", base_model=base_model)
        assert cli(["generate", str(bad), "--prompt", "Hi"]) == 2
        err = capsys.readouterr().err
        assert "metadata field 'base_model'" in err and re.search(message, err)
