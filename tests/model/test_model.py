"""The VisionLanguageModel: splicing visual tokens, token types, loss, cached generation, frozen parts."""
import pytest
import torch

import peft_vlm as pv
from peft_vlm.data.prompting import IGNORE_INDEX, IMAGE_TOKEN_ID
from peft_vlm.runtime.tracking import state_of
from conftest import assert_cached_generation_matches_full_decoding


def test_spliced_visual_tokens_match_what_tower_and_connector_produce(vlm_factory, images):
    model = vlm_factory()
    batch = model.tokenize(["What is in the picture?"], [images[0]])
    with torch.no_grad():
        patches = model.vision_tower(batch["pixel_values"])
        visual = model.encode_images(batch["pixel_values"])
    assert patches.shape[1] == model.vision_tower.num_tokens == 16  # 32x32 image, patch 8
    assert int((batch["input_ids"] == IMAGE_TOKEN_ID).sum()) == visual.shape[1] == model.tokens_per_image
    embeddings = model.embed(batch["input_ids"], batch["pixel_values"])
    assert torch.equal(embeddings[batch["input_ids"] == IMAGE_TOKEN_ID], visual[0].to(embeddings.dtype))


def test_token_types_mark_image_positions_during_forward(vlm_factory, images):
    model = vlm_factory()
    context = state_of(model).context
    seen = []
    model.language_model.model.layers[0].register_forward_pre_hook(
        lambda module, args: seen.append(context.token_types)
    )
    batch = model.tokenize(["<image> left and <image> right"], [[images[0], images[1]]])
    model(**batch)
    expected = (batch["input_ids"] == IMAGE_TOKEN_ID).long()
    assert torch.equal(seen[0], expected)
    assert int(seen[0].sum()) == 2 * model.tokens_per_image


def test_forward_with_labels_returns_loss_on_answers_only(vlm_factory, images):
    model = vlm_factory()
    batch = model.tokenize(["What colour?", "What shape?"], [images[0], images[1]], answers=["red", "a blue square"])
    labelled = batch["labels"] != IGNORE_INDEX
    assert not labelled[batch["input_ids"] == IMAGE_TOKEN_ID].any()
    assert labelled.sum(1).tolist() == [
        len(model.tokenizer(a, add_special_tokens=False).input_ids) + 1 for a in ["red", "a blue square"]
    ]
    output = model(**batch)
    assert output.loss is not None and torch.isfinite(output.loss)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_generate_with_cache_equals_greedy_decoding_without_cache(vlm_factory, images, model_type):
    model = vlm_factory(model_type)
    batch = model.tokenize(["What is in the picture?"], [images[0]])
    assert_cached_generation_matches_full_decoding(model, batch, steps=8)


def test_batched_left_padded_generation_equals_one_by_one(vlm_factory, images):
    model = vlm_factory()
    prompts = ["What is in the picture?", "Colour?"]
    together = model.generate(images=images[:2], prompts=prompts, max_new_tokens=5)
    alone = [
        model.generate(images=[image], prompts=[prompt], max_new_tokens=5)[0] for image, prompt in zip(images, prompts)
    ]
    assert together == alone


def test_vision_tower_and_language_model_are_frozen_connector_trains(vlm_factory):
    model = vlm_factory()
    assert not any(p.requires_grad for p in model.language_model.parameters())
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    assert all(p.requires_grad for p in model.connector.parameters())


@pytest.mark.parametrize("connector", ["linear", "mlp2x_gelu", "vocabulary"])
def test_connectors_project_to_the_language_model_width(vlm_factory, images, connector):
    model = vlm_factory(connector=connector)
    visual = model.encode_images(torch.stack(images))
    assert visual.shape == (3, model.tokens_per_image, model.config.hidden_size)


def test_vocabulary_connector_gives_mixtures_of_the_frozen_word_embeddings(vlm_factory, images, tmp_path):
    model = vlm_factory(connector="vocabulary")
    connector, words = model.connector, model.language_model.get_input_embeddings().weight
    assert model.tokens_per_image == 2 * model.vision_tower.num_tokens
    assert all(p is not words for p in connector.parameters())  # the embeddings are bound, not owned
    with torch.no_grad():
        patches = model.vision_tower(torch.stack(images))
        queries = connector.mlp(patches).reshape(3, model.tokens_per_image, -1)
        keys = words / words.pow(2).mean().sqrt()
        similarity = connector.norm(queries) @ keys.T / queries.shape[-1] ** 0.5
        mixture = torch.softmax(similarity * connector.logit_scale.exp(), -1)
        visual = model.encode_images(torch.stack(images))
    torch.testing.assert_close(visual, mixture @ words)
    assert torch.allclose(mixture.sum(-1), torch.ones(())) and mixture.min() >= 0
    # training moves the connector's MLP only; the adapter file holds no embedding matrix
    batch = model.tokenize(["<image> colour?"], [images[0]], answers=["red"])
    model(**batch).loss.backward()
    assert connector.mlp[0].weight.grad is not None and words.grad is None
    with torch.no_grad():
        connector.mlp[2].weight.add_(torch.randn_like(connector.mlp[2].weight))  # a trained connector
        trained = model.encode_images(torch.stack(images))
    pv.save_adapter(model, tmp_path / "adapter")
    reloaded = pv.load_adapter(vlm_factory(connector="vocabulary"), tmp_path / "adapter")
    with torch.no_grad():
        assert not torch.allclose(trained, visual)
        torch.testing.assert_close(reloaded.encode_images(torch.stack(images)), trained)


def test_placeholder_and_image_count_mismatch_is_a_clear_error(vlm_factory, images):
    model = vlm_factory()
    with pytest.raises(pv.ConfigError, match="prompt #0 has 2 <image> placeholder"):
        model.tokenize(["<image> and <image>"], [images[0]])


def test_unknown_connector_is_refused_by_name(vlm_factory):
    with pytest.raises(pv.ConfigError, match="unknown connector 'mlp9'.*mlp2x_gelu"):
        vlm_factory(connector="mlp9")


def test_any_module_giving_patch_tokens_can_be_the_vision_tower(lm_factory, tokenizer, images):
    class Patches(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 24, kernel_size=16, stride=16)

        def forward(self, pixels):
            return self.conv(pixels).flatten(2).transpose(1, 2)

    model = pv.VisionLanguageModel.from_pretrained(
        llm=lm_factory(), tokenizer=tokenizer, vision=Patches(), vision_options={"image_size": 32}
    )
    assert model.tokens_per_image == 4
    assert model.generate(images=[images[0]], prompts=["Hi"], max_new_tokens=2)


def test_missing_language_model_path_names_the_path(tmp_path):
    with pytest.raises(pv.ModelLoadError, match="no-such-model"):
        pv.VisionLanguageModel.from_pretrained(str(tmp_path / "no-such-model"), vision="ViT-B-32")


def test_the_base_spec_records_a_non_default_attention_kernel_so_a_rebuilt_base_answers_the_same(vlm_factory):
    model = vlm_factory()
    assert model.language_model.config._attn_implementation == "sdpa" and "attn_implementation" not in (
        model.base_spec())
    pv.apply(model, pv.AdaptionPromptConfig(length=2, layers=1))  # runs the kernel under an extensible twin
    assert model.language_model.config._attn_implementation == "peft_vlm_sdpa"
    assert "attn_implementation" not in model.base_spec()
    eager = vlm_factory()
    eager.language_model.set_attn_implementation("eager")
    pv.apply(eager, pv.AdaptionPromptConfig(length=2, layers=1))
    assert eager.language_model.config._attn_implementation == "peft_vlm_eager"
    assert eager.base_spec()["attn_implementation"] == "eager"  # what from_pretrained accepts


def test_an_adapter_that_recorded_the_extensible_kernels_name_rebuilds_with_the_kernel_itself(vlm_factory, tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from peft_vlm.methods.adapter_file import read_adapter

    model = pv.apply(vlm_factory(), pv.AdaptionPromptConfig(length=2, layers=1))
    path = pv.save_adapter(model, tmp_path / "adapter")
    with safe_open(str(path), "pt") as handle:
        metadata, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    metadata["base_model"] = json.dumps({**json.loads(metadata["base_model"]), "attn_implementation": "peft_vlm_eager"})
    save_file(tensors, str(path), metadata=metadata)  # as adapter files of 0.1.0 recorded it
    assert read_adapter(path)[0]["base_model"]["attn_implementation"] == "eager"
