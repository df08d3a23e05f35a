"""`pv.export_transformers`: folders that plain transformers loads, giving the same logits and greedy answers."""
import json
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

import peft_vlm as pv
from peft_vlm.methods.bias_scale import BiasScale
from conftest import train_steps
from tiny_transformers_vlms import BUILDERS, pictures, wrapped

ARCHITECTURES = list(BUILDERS)
RELOAD = Path(__file__).parents[1] / "scripts" / "reload_transformers_export.py"
PROMPTS = ["What is in the picture?", "Describe the image in one sentence. Is there a shape?"]
# Qwen2-VL's o_proj and MLP have no bias in transformers: bias/scale there has no native form (see the refusal test)
BIAS_SCALE = {"llava": pv.BiasScaleConfig(), "llava_next": pv.BiasScaleConfig(), "idefics3": pv.BiasScaleConfig(),
              "qwen2_vl": pv.BiasScaleConfig(targets=["q_proj", "k_proj", "v_proj"]),
              "qwen2_5_vl": pv.BiasScaleConfig(targets=["q_proj", "k_proj", "v_proj"]),
              "paligemma": pv.BiasScaleConfig(targets=["q_proj", "k_proj", "v_proj", "o_proj"]),
              "gemma3": pv.BiasScaleConfig(targets=["q_proj", "k_proj", "v_proj", "o_proj"])}


def trained(arch, *configs, steps=3):
    model = wrapped(arch)
    pv.apply(model, *configs)
    inputs = model.tokenize(PROMPTS, images=pictures(2), answers=["A red circle.", "Yes."])
    train_steps(model, inputs, steps, lr=5e-2)
    return model


def reload_in_plain_transformers(folder, texts, tmp_path, max_new_tokens=5):
    """Run the reload script in a fresh process that never imports peft_vlm; its input_ids, logits, new tokens."""
    images = []
    for index, picture in enumerate(pictures(2)):
        images.append(str(tmp_path / f"image{index}.png"))
        picture.save(images[-1])
    request = {"texts": texts, "images": images,
               "max_new_tokens": max_new_tokens}
    (tmp_path / "request.json").write_text(json.dumps(request))
    output = tmp_path / "reloaded.safetensors"
    subprocess.run([sys.executable, str(RELOAD), str(folder), str(tmp_path / "request.json"), str(output)],
                   check=True, capture_output=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    return load_file(str(output))


# Gemma 3's export is refused (not verified to reload in plain transformers): see the refusal test below
RELOADED = [arch for arch in ARCHITECTURES if arch != "gemma3"]


def test_a_wrapped_gemma3_export_is_refused_by_name_before_anything_is_written(tmp_path):
    model = wrapped("gemma3")
    pv.apply(model, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(pv.ConfigError, match="wrapped Gemma 3 is not supported yet"):
        pv.export_transformers(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("arch", RELOADED)
def test_wrapped_model_exports_its_own_architecture_with_the_same_logits_and_answers(arch, merged, tmp_path):
    model = trained(arch, BIAS_SCALE[arch], peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"]))
    if merged:
        pv.merge(model)
    pv.export_transformers(model, tmp_path / "exported")
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["architectures"] == [type(model.model).__name__] and "peft_vlm" not in json.dumps(config)
    texts = [model.prompt_text(p, 1, True) for p in PROMPTS]
    reloaded = reload_in_plain_transformers(tmp_path / "exported", texts, tmp_path)
    inputs = model.tokenize(PROMPTS, images=pictures(2))
    assert torch.equal(reloaded["input_ids"], inputs["input_ids"])
    with torch.no_grad():
        expected = model(**inputs).logits
    assert torch.allclose(reloaded["logits"], expected, atol=1e-4, rtol=0)
    assert reloaded["new_tokens"].tolist() == model.generate_ids(**inputs, max_new_tokens=5).tolist()


@pytest.mark.parametrize("arch", RELOADED)
def test_export_leaves_an_unmerged_model_unmerged(arch, tmp_path):
    model = trained(arch, BIAS_SCALE[arch], peft.LoraConfig(r=4, target_modules=["q_proj"]))
    inputs = model.tokenize(PROMPTS, images=pictures(2))
    with torch.no_grad():
        before = model(**inputs).logits
    pv.export_transformers(model, tmp_path)
    assert any(isinstance(m, LoraLayer) for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, before, atol=1e-5, rtol=0)
    pv.save_adapter(model, tmp_path / "adapter")  # still an unmerged, savable model


@pytest.mark.parametrize("config, name", [
    (pv.AdaptionPromptConfig(length=2, layers=1), "adaption_prompt"),
    (pv.VisualExpertConfig(rank=2), "visual_expert"),
])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_method_with_no_native_form_is_refused_by_name(arch, config, name, tmp_path):
    model = wrapped(arch)
    pv.apply(model, pv.BiasScaleConfig(), config)
    with pytest.raises(pv.PeftVlmError, match=f"method\\(s\\) {name} have no native transformers form"):
        pv.export_transformers(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch, layers", [("qwen2_vl", "down_proj, gate_proj, o_proj, up_proj"),
                                          ("paligemma", "down_proj, gate_proj, up_proj")])
def test_a_bias_the_architecture_has_no_place_for_is_refused_naming_the_layers(arch, layers, tmp_path):
    model = trained(arch, pv.BiasScaleConfig())
    with pytest.raises(pv.PeftVlmError, match=f"gives {layers} a bias that {arch}"):
        pv.export_transformers(model, tmp_path)
    assert any(isinstance(m, BiasScale) for m in model.modules())  # unmerged again


def test_cli_export_writes_base_and_adapter_as_a_transformers_folder(tmp_path):
    from transformers import AutoModelForImageTextToText

    from peft_vlm.cli import main
    from tiny_transformers_vlms import save_tiny

    base = pv.VisionLanguageModel.from_pretrained(save_tiny("llava", tmp_path / "base"))
    pv.apply(base, pv.BiasScaleConfig(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, parameter in base.named_parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))
    pv.save_adapter(base, tmp_path / "adapter")
    assert main(["export", str(tmp_path / "adapter"), str(tmp_path / "exported")]) == 0
    exported = AutoModelForImageTextToText.from_pretrained(tmp_path / "exported").eval()
    inputs = base.tokenize(PROMPTS, images=pictures(2))
    with torch.no_grad():
        assert torch.allclose(exported(**inputs).logits, base(**inputs).logits, atol=1e-4, rtol=0)


def test_cli_export_refuses_a_method_with_no_native_form(tmp_path, capsys):
    from peft_vlm.cli import main
    from tiny_transformers_vlms import save_tiny

    base = pv.VisionLanguageModel.from_pretrained(save_tiny("llava", tmp_path / "base"))
    pv.save_adapter(pv.apply(base, pv.AdaptionPromptConfig(length=2, layers=1)), tmp_path / "adapter")
    assert main(["export", str(tmp_path / "adapter"), str(tmp_path / "exported")]) == 2
    assert "adaption_prompt have no native transformers form" in capsys.readouterr().err


# -- a model built here from a transformers vision tower exports as LLaVA -------------------------------------------
def built_here(tmp_path, tower="clip", connector="mlp2x_gelu", **lm_options):
    from conftest import make_lm, make_tokenizer
    from tiny_transformers_vlms import save_tiny_tower

    folder = save_tiny_tower(tower, tmp_path / tower)
    lm = make_lm("llama", **lm_options)
    return pv.VisionLanguageModel.from_pretrained(llm=lm, tokenizer=make_tokenizer(), vision=f"transformers:{folder}",
                                                  connector=connector).eval()


def train_built(model, steps=3):
    inputs = model.tokenize(PROMPTS, images=[[p] for p in pictures(2)], answers=["A red circle.", "Yes."])
    train_steps(model, inputs, steps, lr=5e-2)
    return model


def assert_llava_export_matches(model, tmp_path):
    from peft_vlm.data.prompting import IMAGE_TOKEN_ID, format_chat, with_placeholders

    pv.export_transformers(model, tmp_path / "exported")
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"] and "peft_vlm" not in json.dumps(config)
    texts = [format_chat(model.tokenizer, with_placeholders(p, 1), True) for p in PROMPTS]
    reloaded = reload_in_plain_transformers(tmp_path / "exported", texts, tmp_path)
    inputs = model.tokenize(PROMPTS, images=[[p] for p in pictures(2)])
    image_id = config.get("image_token_id", config.get("image_token_index"))
    ids = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN_ID, image_id)
    assert torch.equal(reloaded["input_ids"], ids)
    with torch.no_grad():
        expected = model(**inputs).logits
    vocab = expected.shape[-1]  # an image token appended to the vocabulary adds one (suppressed) column
    assert torch.allclose(reloaded["logits"][..., :vocab], expected, atol=1e-4, rtol=0)
    assert reloaded["new_tokens"].tolist() == model.generate_ids(**inputs, max_new_tokens=5).tolist()


@pytest.mark.parametrize("merge_first", [False, True])
def test_clip_tower_mlp2x_gelu_with_lora_and_bias_scale_exports_as_llava(merge_first, tmp_path):
    model = built_here(tmp_path)
    pv.apply(model, pv.BiasScaleConfig(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model = train_built(model)
    if merge_first:
        pv.merge(model)
    assert_llava_export_matches(model, tmp_path)


def test_siglip_tower_with_a_linear_connector_exports_as_llava(tmp_path):
    model = train_built(built_here(tmp_path, tower="siglip", connector="linear"))
    assert_llava_export_matches(model, tmp_path)


def test_an_image_token_beyond_the_vocabulary_gets_a_suppressed_row(tmp_path):
    model = built_here(tmp_path, vocab_size=len(make_tiny_tokenizer()))
    pv.apply(model, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    assert_llava_export_matches(train_built(model), tmp_path)
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config.get("image_token_id", config.get("image_token_index")) == config["text_config"]["vocab_size"] - 1


def make_tiny_tokenizer():
    from conftest import make_tokenizer

    return make_tokenizer()


def test_a_connector_llava_has_no_form_for_is_refused(tmp_path):
    model = built_here(tmp_path, connector="downsample2x2_mlp")
    with pytest.raises(pv.ConfigError, match="connector 'downsample2x2_mlp'"):
        pv.export_transformers(model, tmp_path / "out")


def test_cli_export_of_a_model_built_here_from_its_adapter_reloads_in_plain_transformers(tmp_path):
    """`peft-vlm export` rebuilds the base (LM folder + transformers tower folder) from the adapter file alone."""
    from conftest import make_lm, make_tokenizer
    from peft_vlm.cli import main
    from peft_vlm.data.prompting import IMAGE_TOKEN_ID, format_chat, with_placeholders
    from tiny_transformers_vlms import save_tiny_tower

    make_lm("llama").save_pretrained(tmp_path / "lm")
    make_tokenizer().save_pretrained(tmp_path / "lm")
    tower = save_tiny_tower("clip", tmp_path / "clip")
    model = pv.VisionLanguageModel.from_pretrained(str(tmp_path / "lm"), vision=f"transformers:{tower}").eval()
    pv.apply(model, pv.BiasScaleConfig(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    train_built(model)
    pv.save_adapter(model, tmp_path / "adapter")
    del model  # the CLI builds its own base
    assert main(["export", str(tmp_path / "adapter"), str(tmp_path / "exported")]) == 0
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]

    fresh = pv.load_adapter(
        pv.VisionLanguageModel.from_pretrained(str(tmp_path / "lm"), vision=f"transformers:{tower}").eval(),
        tmp_path / "adapter")
    texts = [format_chat(fresh.tokenizer, with_placeholders(p, 1), True) for p in PROMPTS]
    reloaded = reload_in_plain_transformers(tmp_path / "exported", texts, tmp_path)
    inputs = fresh.tokenize(PROMPTS, images=[[p] for p in pictures(2)])
    ids = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN_ID,
                                          config.get("image_token_id", config.get("image_token_index")))
    assert torch.equal(reloaded["input_ids"], ids)
    with torch.no_grad():
        expected = fresh(**inputs).logits
        untrained = pv.VisionLanguageModel.from_pretrained(str(tmp_path / "lm"), vision=f"transformers:{tower}")
        assert not torch.allclose(untrained.eval()(**inputs).logits, expected, atol=1e-3)  # the adapter is in it
    assert torch.allclose(reloaded["logits"][..., :expected.shape[-1]], expected, atol=1e-4, rtol=0)
    assert reloaded["new_tokens"].tolist() == fresh.generate_ids(**inputs, max_new_tokens=5).tolist()


def test_lora_in_the_vision_tower_is_folded_into_the_exported_llava_tower(tmp_path):
    model = built_here(tmp_path)
    pv.apply(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"]), target="vision")
    assert_llava_export_matches(train_built(model), tmp_path)
    assert any(isinstance(m, LoraLayer) for m in model.vision_tower.modules())  # unmerged again after the export


def test_wrapped_model_exports_lora_in_its_vision_tower(tmp_path):
    model = trained("llava", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    pv.apply(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), target="vision")
    inputs = model.tokenize(PROMPTS, images=pictures(2), answers=["A red circle.", "Yes."])
    train_steps(model, inputs, 3, lr=5e-2)
    pv.export_transformers(model, tmp_path / "exported")
    reloaded = reload_in_plain_transformers(tmp_path / "exported", [model.prompt_text(p, 1, True) for p in PROMPTS],
                                            tmp_path)
    inputs = model.tokenize(PROMPTS, images=pictures(2))
    with torch.no_grad():
        assert torch.allclose(reloaded["logits"], model(**inputs).logits, atol=1e-4, rtol=0)
    assert reloaded["new_tokens"].tolist() == model.generate_ids(**inputs, max_new_tokens=5).tolist()


# -- an export never destroys a model -------------------------------------------------------------------------------
def lora_and_bias_scale(arch="llava"):
    return trained(arch, pv.BiasScaleConfig(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def contents(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def test_export_leaves_the_model_in_memory_bitwise_unchanged(tmp_path):
    model = lora_and_bias_scale()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    pv.export_transformers(model, tmp_path / "exported")
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)


@pytest.mark.parametrize("kind", ["previous export", "folder with a file", "link to a previous export"])
def test_export_into_a_folder_that_is_not_empty_is_refused_unless_overwrite(kind, tmp_path):
    model = lora_and_bias_scale()
    target = tmp_path / "target"
    if kind == "folder with a file":
        target.mkdir()
        (target / "notes.txt").write_text("mine")
    else:
        pv.export_transformers(model, target)
    destination = target
    if kind == "link to a previous export":
        destination = tmp_path / "link"
        destination.symlink_to(target, target_is_directory=True)
    before = contents(target)
    with pytest.raises(pv.ConfigError, match=f"'{target}' is a .*; pass overwrite=True"):
        pv.export_transformers(model, destination)
    assert contents(target) == before
    pv.export_transformers(model, destination, overwrite=True)
    assert (target / "config.json").is_file() and not (target / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"target", destination.name})  # nothing temporary


def test_export_never_replaces_the_base_models_own_folder_even_with_overwrite(tmp_path, capsys):
    from peft_vlm.cli import main
    from tiny_transformers_vlms import save_tiny

    base_folder = Path(save_tiny("llava", tmp_path / "models" / "base"))
    base = pv.VisionLanguageModel.from_pretrained(str(base_folder))
    pv.save_adapter(pv.apply(base, pv.BiasScaleConfig()), tmp_path / "adapter")
    before = contents(base_folder)
    for folder in (base_folder, base_folder.parent):  # the folder itself, or one that holds it
        with pytest.raises(pv.ConfigError, match=f"'{folder}' holds the base model"):
            pv.export_transformers(base, folder, overwrite=True)
        assert main(["export", str(tmp_path / "adapter"), str(folder), "--overwrite"]) == 2
        assert "holds the base model" in capsys.readouterr().err
    assert contents(base_folder) == before


def test_cli_export_over_a_previous_export_needs_overwrite(tmp_path, capsys):
    from peft_vlm.cli import main
    from tiny_transformers_vlms import save_tiny

    base = pv.VisionLanguageModel.from_pretrained(save_tiny("llava", tmp_path / "base"))
    pv.save_adapter(pv.apply(base, pv.BiasScaleConfig()), tmp_path / "adapter")
    command = ["export", str(tmp_path / "adapter"), str(tmp_path / "exported")]
    assert main(command) == 0
    assert main(command) == 2
    error = capsys.readouterr().err.splitlines()[-1]  # (after the loading progress bar)
    assert error.startswith("peft-vlm export: error: ")
    assert error.endswith("is a model folder; pass overwrite=True (--overwrite) to replace it")
    assert main([*command, "--overwrite"]) == 0


@pytest.mark.parametrize("previous", [True, False])
def test_a_write_that_fails_half_way_leaves_the_previous_export_and_no_temporary_folder(previous, tmp_path,
                                                                                         monkeypatch):
    import errno

    import transformers.modeling_utils

    model = lora_and_bias_scale()
    target = tmp_path / "exported"
    if previous:
        pv.export_transformers(model, target)
    before = contents(target) if previous else None

    def disk_full(*args, **kwargs):  # the config is written by then, the weights are not
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", disk_full)
    with pytest.raises(pv.PeftVlmError, match=f"writing '{target}' failed \\(No space left on device\\)"):
        pv.export_transformers(model, target, overwrite=True)
    assert (contents(target) == before) if previous else not target.exists()
    assert [p.name for p in tmp_path.iterdir()] == (["exported"] if previous else [])


@pytest.mark.parametrize("case", ["a file", "under a file", "unwritable parent"])
def test_a_destination_that_cannot_be_a_folder_is_one_clear_error(case, tmp_path, monkeypatch):
    model = lora_and_bias_scale()
    (tmp_path / "file").write_text("x")
    destination = {"a file": tmp_path / "file", "under a file": tmp_path / "file" / "out",
                   "unwritable parent": tmp_path / "locked" / "out"}[case]
    if case == "unwritable parent":  # (as root, a folder's permissions do not stop a write)
        def refuse(self, *args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(Path, "mkdir", refuse)
    expected = {"a file": "is a file, not a folder", "under a file": f"lies in '{tmp_path / 'file'}', which is a file",
                "unwritable parent": "cannot write .*Permission denied"}[case]
    with pytest.raises(pv.ConfigError, match=expected) as error:
        pv.export_transformers(model, destination)
    assert "\n" not in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
