"""Flamingo's gated cross-attention: exact identity at start, per-image masking, cache, training, adapter files."""
import pytest
import torch

import peft_vlm as pv
from peft_vlm.methods.gated_cross_attention import GatedCrossAttentionBlock, preceding_image
from peft_vlm.methods.presets import load_preset, preset_card
from peft_vlm.runtime.token_context import IMAGE, TEXT, RoutingContext
from conftest import assert_cached_generation_matches_full_decoding, train_steps

RESAMPLER = "perceiver_resampler"


def logits(model, batch, **kwargs):
    with torch.no_grad():
        return model(**batch, **kwargs).logits


def open_gates(model, value=0.7):
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("_gate") and ".gated_cross_attention." in name:
                parameter.fill_(value)


def interleaved(model, images, answers=None):
    prompts = ["Hi <image> what <image> compare", "Colour?", "<image> describe"]
    return model.tokenize(prompts, [images[:2], None, images[2]], answers=answers)


def test_logits_at_init_equal_the_base_exactly(vlm_factory, images):
    base, model = vlm_factory(connector=RESAMPLER), vlm_factory(connector=RESAMPLER)
    pv.apply(model, pv.GatedCrossAttentionConfig(every=1))
    for batch in (interleaved(base, images), base.tokenize(["Describe the colour.", "Hi"])):
        assert (logits(model, batch) - logits(base, batch)).abs().max().item() == 0


def test_blocks_go_before_every_nth_decoder_layer(vlm_factory):
    model = pv.apply(vlm_factory(num_hidden_layers=5), pv.GatedCrossAttentionConfig(every=2))
    layers = model.language_model.model.layers
    assert [hasattr(layer, "gated_cross_attention") for layer in layers] == [True, False, True, False, True]


def test_each_position_attends_to_the_most_recent_image_of_its_row():
    types = torch.tensor([[TEXT, IMAGE, IMAGE, TEXT, IMAGE, IMAGE, IMAGE, IMAGE, TEXT],
                          [TEXT, TEXT, TEXT, TEXT, TEXT, TEXT, TEXT, TEXT, TEXT],
                          [IMAGE, IMAGE, TEXT, TEXT, TEXT, TEXT, TEXT, TEXT, TEXT]])
    context = RoutingContext(token_types=types)
    visual, owner = torch.zeros(4, 2, 8), torch.tensor([0, 0, 0, 2])  # row 0: three images (two adjacent)
    assert preceding_image(context, visual, owner, 3, 9).tolist() == [
        [-1, 0, 0, 0, 1, 1, 2, 2, 2], [-1] * 9, [3] * 9]
    context.token_types = None  # a cached decoding step: after the whole prompt
    assert preceding_image(context, visual, owner, 3, 1).tolist() == [[2], [-1], [3]]


def test_changing_one_image_changes_only_the_positions_that_attend_to_it():
    torch.manual_seed(0)
    types = torch.tensor([[TEXT, IMAGE, IMAGE, TEXT, TEXT, IMAGE, IMAGE, TEXT]])
    context = RoutingContext(token_types=types)
    block = GatedCrossAttentionBlock(context, hidden=16, heads=2, ff_mult=2, device="cpu", dtype=torch.float32)
    x, visual = torch.randn(1, 8, 16), torch.randn(2, 2, 16)
    context.extras = {"visual_tokens": visual, "image_owner": torch.tensor([0, 0])}
    before = block.cross_attention(x)
    context.extras["visual_tokens"] = torch.cat([visual[:1] + 1.0, visual[1:]])
    changed = (block.cross_attention(x) - before).abs().amax(-1)[0] > 0
    assert changed.tolist() == [False, True, True, True, True, False, False, False]
    assert before[0, 0].abs().max() == 0 and not before.isnan().any()  # nothing precedes position 0


def test_cached_greedy_generation_equals_uncached(vlm_factory, images):
    model = pv.apply(vlm_factory(connector=RESAMPLER), pv.GatedCrossAttentionConfig(every=1))
    open_gates(model)
    batch = interleaved(model, images)
    assert_cached_generation_matches_full_decoding(model, batch, steps=5)


def test_trains_with_the_resampler_then_saves_and_loads_exactly(vlm_factory, images, tmp_path):
    model = pv.apply(vlm_factory(connector=RESAMPLER), pv.GatedCrossAttentionConfig(every=1))
    batch = interleaved(model, images, answers=["a circle", "red", "a square"])
    losses = train_steps(model, batch, steps=8)
    assert losses[-1] < losses[0] - 0.1
    pv.save_adapter(model, tmp_path / "adapter")
    reloaded = pv.load_adapter(vlm_factory(connector=RESAMPLER), tmp_path / "adapter")
    assert torch.equal(logits(reloaded, batch), logits(model, batch))


def test_summary_lists_the_blocks_in_group_vision_with_the_resampler(vlm_factory):
    model = pv.apply(vlm_factory(connector=RESAMPLER), "flamingo")
    rows = {(row.method, row.group): row.parameters for row in pv.trainable_summary(model).rows}
    hidden, layers = 64, 1  # tiny LM: 2 layers, a block before every 4th -> layer 0 only
    per_block = 2 * hidden + 4 * hidden * hidden + (2 * hidden + 8 * hidden * hidden + 5 * hidden) + 2
    assert rows[("gated_cross_attention", "vision")] == layers * per_block
    assert rows[("connector", "vision")] > 0


def test_flamingo_preset_and_card_name_the_connector():
    (config,) = load_preset("flamingo")
    assert isinstance(config, pv.GatedCrossAttentionConfig) and config.every == 4
    assert 'connector="perceiver_resampler"' in preset_card("flamingo")


@pytest.mark.parametrize("options", [{"every": 0}, {"heads": 0}])
def test_bad_options_are_config_errors(options):
    with pytest.raises(pv.ConfigError, match="GatedCrossAttentionConfig"):
        pv.GatedCrossAttentionConfig(**options)


def test_flamingo_layout_keeps_images_out_of_the_sequence_and_reads_them_through_the_blocks(vlm_factory, images):
    base = vlm_factory(connector=RESAMPLER)
    text_only = base.tokenize(["\nWhat is in the picture?"], [None])
    model = pv.apply(vlm_factory(connector=RESAMPLER),
                     pv.GatedCrossAttentionConfig(every=1, visual_tokens_in_sequence=False))
    batch = model.tokenize(["What is in the picture?", "Colour?"], [images[0], None])
    assert model.tokens_per_image == 0 and batch["input_ids"].shape[1] == text_only["input_ids"].shape[1]
    assert torch.equal(logits(model, batch)[:1], logits(base, text_only))  # zero gates: the model is unchanged
    open_gates(model)
    other = model.tokenize(["What is in the picture?", "Colour?"], [images[1], None])
    changed = (logits(model, batch) - logits(model, other)).abs().amax(dim=(1, 2))
    assert changed[0] > 0 and changed[1] == 0  # every position of row 0 reads its image; row 1 has none
    assert_cached_generation_matches_full_decoding(model, batch, steps=4)


def test_flamingo_layout_trains_and_reloads_exactly(vlm_factory, images, tmp_path):
    config = pv.GatedCrossAttentionConfig(every=1, visual_tokens_in_sequence=False)
    model = pv.apply(vlm_factory(connector=RESAMPLER), config)
    batch = model.tokenize(["Shape?", "Colour?", "Describe."], images[:3], answers=["a circle", "red", "a square"])
    losses = train_steps(model, batch, steps=8)
    assert losses[-1] < losses[0] - 0.1
    pv.save_adapter(model, tmp_path / "adapter")
    reloaded = pv.load_adapter(vlm_factory(connector=RESAMPLER), tmp_path / "adapter")
    assert reloaded.tokens_per_image == 0 and torch.equal(logits(reloaded, batch), logits(model, batch))
