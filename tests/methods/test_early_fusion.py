"""LLaMA-Adapter V2 visual fusion: the paper's early fusion and the official code's visual query."""
import pytest
import torch

import peft_vlm as pv
from peft_vlm.methods.early_fusion import visual_tokens_by_row
from conftest import assert_cached_generation_matches_full_decoding


def _open_gates(model, value=0.5):
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".gate"):
                parameter.fill_(value)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_logits_at_init_equal_the_base_model_exactly_with_images(vlm_factory, images, implementation):
    model = vlm_factory()
    model.language_model.config._attn_implementation = implementation
    batch = model.tokenize(["What is in the picture?", "Colour?"], [images[0], None])
    before = _logits(model, batch)
    pv.apply(model, pv.EarlyFusionConfig(layers=1))
    assert (_logits(model, batch) - before).abs().max().item() == 0


def test_visual_tokens_enter_only_the_first_layers(vlm_factory):
    model = pv.apply(vlm_factory(), pv.EarlyFusionConfig(layers=1))
    layers = model.language_model.model.layers
    assert hasattr(layers[0].self_attn, "early_fusion") and not hasattr(layers[1].self_attn, "early_fusion")


def test_open_gates_fuse_the_image_into_its_own_row_only(vlm_factory, images):
    closed = pv.apply(vlm_factory(), pv.EarlyFusionConfig(layers=2))  # zero gates: the base model's outputs
    model = vlm_factory()
    _open_gates(pv.apply(model, pv.EarlyFusionConfig(layers=2)))
    batch = model.tokenize(["What is in the picture?", "What is in the picture?"], [images[0], None])
    fused, plain = _logits(model, batch), _logits(closed, batch)
    assert (fused[0] - plain[0]).abs().max() > 1e-3
    assert torch.equal(fused[1], plain[1])  # a text-only row gets no visual contribution


def test_rows_with_several_images_attend_to_all_of_them():
    visual = torch.arange(3 * 2 * 1, dtype=torch.float32).view(3, 2, 1)
    tokens, mask, has_image = visual_tokens_by_row(visual, torch.tensor([0, 0, 2]), rows=3)
    assert tokens.shape == (3, 4, 1)
    assert tokens[0, :, 0].tolist() == [0, 1, 2, 3] and tokens[2, :2, 0].tolist() == [4, 5]
    assert mask.tolist() == [[True] * 4, [True] * 4, [True, True, False, False]]
    assert has_image.tolist() == [True, False, True]


def test_early_fusion_gates_train_with_the_vision_group(vlm_factory):
    model = pv.apply(vlm_factory(), pv.EarlyFusionConfig(layers=2))
    entry = next(e for e in pv.runtime.tracking.state_of(model).methods() if e.name == "early_fusion")
    assert list(entry.parameters) == ["vision"] and len(entry.parameters["vision"]) == 2


def test_official_visual_query_needs_adaption_prompts_first(vlm_factory):
    with pytest.raises(pv.IncompatibleMethodsError, match="apply an AdaptionPromptConfig before it"):
        pv.apply(vlm_factory(), pv.VisualQueryPromptConfig(width=16, depth=1, heads=2))


def test_official_visual_query_is_added_to_the_late_prompts_of_image_rows(vlm_factory, images):
    model = pv.apply(
        vlm_factory(), pv.AdaptionPromptConfig(length=3, layers=1),
        pv.VisualQueryPromptConfig(width=16, depth=1, heads=2),
    )
    batch = model.tokenize(["What is in the picture?", "What is in the picture?"], [images[0], None])
    text_only = pv.apply(vlm_factory(), pv.AdaptionPromptConfig(length=3, layers=1))
    text_only.load_state_dict(model.state_dict(), strict=False)
    _open_gates(model), _open_gates(text_only)
    with_query, without_query = _logits(model, batch), _logits(text_only, batch)
    assert (with_query[0] - without_query[0]).abs().max() > 1e-3
    # the text row's prompts get a zero offset (same values; batched matmuls may round differently)
    torch.testing.assert_close(with_query[1], without_query[1], atol=1e-6, rtol=1e-6)
    patches = torch.randn(2, model.vision_tower.num_tokens, model.vision_tower.width)
    assert model.visual_query.per_image(patches).shape == (2, 3, model.config.hidden_size)  # one query per prompt


def test_paper_layout_keeps_images_out_of_the_sequence_and_starts_from_the_text_only_model(vlm_factory, images):
    base = vlm_factory()
    text_only = base.tokenize(["\nWhat is in the picture?"], [None])  # the placeholder's line break stays
    model = pv.apply(vlm_factory(), pv.EarlyFusionConfig(layers=2, visual_tokens_in_sequence=False))
    batch = model.tokenize(["What is in the picture?"], [images[0]])
    assert model.tokens_per_image == 0 and batch["input_ids"].shape == text_only["input_ids"].shape
    assert torch.equal(_logits(model, batch), _logits(base, text_only))  # zero gates: the image has no effect yet
    _open_gates(model)
    assert not torch.equal(_logits(model, batch), _logits(base, text_only))  # the first layers now read the image
    other = model.tokenize(["What is in the picture?"], [images[1]])
    assert not torch.equal(_logits(model, batch), _logits(model, other))


def test_paper_layout_generates_with_the_cache_like_full_decoding(vlm_factory, images):
    model = pv.apply(vlm_factory(), pv.EarlyFusionConfig(layers=1, visual_tokens_in_sequence=False))
    _open_gates(model)
    batch = model.tokenize(["Colour?", "What is in the picture?"], [images[0], images[1]])
    assert_cached_generation_matches_full_decoding(model, batch, steps=5)


def test_paper_layout_refuses_the_visual_expert(vlm_factory):
    model = pv.apply(vlm_factory(), pv.EarlyFusionConfig(layers=1, visual_tokens_in_sequence=False))
    with pytest.raises(pv.IncompatibleMethodsError, match="visual expert"):
        pv.apply(model, pv.VisualExpertConfig(rank=2))


def test_paper_layout_after_the_visual_expert_is_refused_before_touching_the_model(vlm_factory):
    model = pv.apply(vlm_factory(), pv.VisualExpertConfig(rank=2))
    with pytest.raises(pv.IncompatibleMethodsError, match="visual expert"):
        pv.apply(model, pv.EarlyFusionConfig(layers=1, visual_tokens_in_sequence=False))
    assert not any(name.endswith("early_fusion") for name, _ in model.named_modules())
    assert model.images_in_sequence
