"""Visual inputs as one typed value: what the model announces for a call, what methods read, the older keyword form."""
import pytest
import torch

import peft_vlm as pv
from peft_vlm.data.prompting import IMAGE_TOKEN_ID
from peft_vlm.runtime.token_context import IMAGE, VisualInputs
from peft_vlm.runtime.tracking import state_of


def seen_visual_inputs(model, batch):
    context, seen = state_of(model).context, []
    handle = model.language_model.register_forward_pre_hook(lambda *_: seen.append(context.visual))
    with torch.no_grad():
        model(**batch)
    handle.remove()
    return seen[0]


def test_the_model_announces_typed_visual_inputs_for_each_call(vlm_factory, images):
    model = vlm_factory()
    batch = model.tokenize(["Hi", "<image> and <image>", "Colour?"], [None, images[:2], images[2]])
    visual = seen_visual_inputs(model, batch)
    assert isinstance(visual, VisualInputs)
    assert visual.image_owner.tolist() == [1, 1, 2]
    assert torch.equal(visual.token_types, (batch["input_ids"] == IMAGE_TOKEN_ID).long())
    with torch.no_grad():
        assert torch.equal(visual.visual_tokens, model.encode_images(batch["pixel_values"]))
        assert torch.equal(visual.patch_tokens, model.vision_tower(batch["pixel_values"]))
    assert visual.tokens_per_image == model.tokens_per_image


def test_a_text_only_call_has_token_types_and_no_images(vlm_factory):
    visual = seen_visual_inputs(vlm_factory(), vlm_factory().tokenize(["Hi", "Colour?"]))
    assert not visual.has_images and visual.visual_tokens is None and visual.patch_tokens is None
    assert int(visual.token_types.sum()) == 0


def test_the_visual_inputs_are_cleared_after_the_call(vlm_factory, images):
    model = vlm_factory()
    model(**model.tokenize(["Colour?"], [images[0]]))
    assert state_of(model).context.visual == VisualInputs()


def test_the_keyword_form_of_token_types_gives_the_same_typed_value(lm_factory):
    model = pv.apply(lm_factory(), pv.VisualExpertConfig(rank=2))
    types = (torch.arange(8) < 4).long()[None]
    visual, owner = torch.randn(1, 4, 64), torch.tensor([0])
    with pv.token_types(model, types, visual_tokens=visual, image_owner=owner) as context:
        keyword_form = context.visual
    with pv.token_types(model, VisualInputs(visual_tokens=visual, image_owner=owner, token_types=types)) as context:
        typed_form = context.visual
    assert keyword_form == typed_form and keyword_form.token_types is types
    assert (keyword_form.tokens_per_image, context.announced) == (4, None)  # announced only inside the block


def test_the_same_types_through_either_form_give_the_same_logits(lm_factory):
    model = pv.apply(lm_factory(), pv.VisualExpertConfig(rank=2))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_()
    ids, types = torch.arange(8)[None], (torch.arange(8) >= 4).long()[None] * IMAGE
    with torch.no_grad(), pv.token_types(model, types):
        old = model(input_ids=ids).logits
    with torch.no_grad(), pv.token_types(model, VisualInputs(token_types=types)):
        new = model(input_ids=ids).logits
    with torch.no_grad():
        text_only = model(input_ids=ids).logits
    assert torch.equal(old, new) and not torch.equal(new, text_only)


def test_an_unknown_visual_input_keyword_is_refused_by_name(lm_factory):
    model = pv.apply(lm_factory(), pv.BiasScaleConfig())
    with pytest.raises(pv.ConfigError, match="unknown visual input.*pixels.*visual_tokens"):
        with pv.token_types(model, torch.zeros(1, 4, dtype=torch.long), pixels=torch.zeros(1)):
            pass


def test_image_tokens_without_their_owner_rows_are_refused():
    with pytest.raises(pv.ConfigError, match="image_owner"):
        VisualInputs(visual_tokens=torch.zeros(2, 4, 8))
    with pytest.raises(pv.ConfigError, match="one entry per image, got visual_tokens=2, image_owner=1"):
        VisualInputs(visual_tokens=torch.zeros(2, 4, 8), image_owner=torch.tensor([0]))


def test_early_fusion_declares_that_it_takes_the_images_out_of_the_sequence(vlm_factory):
    paper, in_sequence, plain = vlm_factory(), vlm_factory(), vlm_factory()
    pv.apply(paper, pv.EarlyFusionConfig(layers=1, visual_tokens_in_sequence=False))
    pv.apply(in_sequence, pv.EarlyFusionConfig(layers=1, visual_tokens_in_sequence=True))
    assert [m.images_in_sequence for m in (paper, in_sequence, plain)] == [False, True, True]
    assert paper.tokens_per_image == 0 and in_sequence.tokens_per_image == plain.tokens_per_image > 0
    assert not any(entry.method.images_in_sequence for entry in state_of(paper).methods())
