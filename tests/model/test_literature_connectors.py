"""Connectors with learned queries (perceiver resampler, Q-Former) and interleaved images with KOSMOS boundaries."""
import pytest
import torch

import peft_vlm as pv
from peft_vlm.model.connectors import build_connector
from peft_vlm.data.prompting import IMAGE_TOKEN_ID
from peft_vlm.runtime.token_context import IMAGE
from peft_vlm.runtime.tracking import state_of

from conftest import train_steps

CONNECTORS = pv.available_connectors()
BOUNDARIES = ("<img>", "</img>")
PROMPTS = ["<image>left of <image> middle then <image>", "describe <image>"]


def image_runs(row):
    """(start, end) of every run of image sentinels in a row of token ids."""
    runs, start = [], None
    for position, token in enumerate([*row, None]):
        if token == IMAGE_TOKEN_ID and start is None:
            start = position
        elif token != IMAGE_TOKEN_ID and start is not None:
            runs.append((start, position))
            start = None
    return runs


def seen_token_types(model, batch):
    """Token types the language model's call ran with, as methods read them."""
    seen = {}
    context = state_of(model).context
    handle = model.language_model.register_forward_pre_hook(lambda *_: seen.update(types=context.token_types))
    with torch.no_grad():
        model(**batch)
    handle.remove()
    return seen["types"]


@pytest.mark.parametrize("connector,tokens", [("perceiver_resampler", 64), ("qformer", 32)])
def test_learned_queries_give_a_fixed_number_of_visual_tokens_per_image(connector, tokens):
    module = build_connector(connector, vision_width=48, hidden_size=64)
    for patches in (16, 49):
        assert module.num_output_tokens(patches) == tokens
        assert module(torch.randn(3, patches, 48)).shape == (3, tokens, 64)


@pytest.mark.parametrize("boundaries", [None, BOUNDARIES], ids=["plain", "kosmos"])
@pytest.mark.parametrize("connector", CONNECTORS)
def test_three_images_in_different_places_give_visual_tokens_and_types_at_exact_positions(
    vlm_factory, images, tokenizer, connector, boundaries
):
    model = vlm_factory(connector=connector)
    model.image_boundaries = boundaries
    batch = model.tokenize(PROMPTS, [images, images[1]])
    count = model.tokens_per_image
    ids = batch["input_ids"]
    runs = [image_runs(row) for row in ids.tolist()]
    assert [len(r) for r in runs] == [3, 1] and all(end - start == count for row in runs for start, end in row)
    (a, b), (c, d), (e, f) = runs[0]
    between = [tokenizer.decode(ids[0, s:t]) for s, t in ((b, c), (d, e))]
    if boundaries:
        assert between == ["</img>left of <img>", "</img> middle then <img>"]
        assert tokenizer.decode(ids[0, f:]).startswith("</img>") and tokenizer.decode(ids[0, :a]).endswith("<img>")
    else:
        assert between == ["left of ", " middle then "]
    assert torch.equal(seen_token_types(model, batch), (ids == IMAGE_TOKEN_ID).long())
    seen = []  # what the connector gave (a question-reading connector also read each image's prompt)
    handle = model.connector.register_forward_hook(lambda module, args, output: seen.append(output))
    with torch.no_grad():
        embedded = model.embed(ids, batch["pixel_values"])
        visual = seen[0]
        if not model.connector.reads_question:
            assert torch.equal(visual, model.encode_images(batch["pixel_values"]))
    handle.remove()
    spliced = [embedded[row, start:end] for row, row_runs in enumerate(runs) for start, end in row_runs]
    for image, tokens in enumerate(spliced):
        assert torch.equal(tokens, visual[image])


METHODS = {
    "gated_cross_attention": lambda: pv.GatedCrossAttentionConfig(every=1),
    "early_fusion": lambda: pv.EarlyFusionConfig(layers=1),
    "visual_expert": lambda: pv.VisualExpertConfig(rank=2),
    "adaption_prompt": lambda: pv.AdaptionPromptConfig(length=2, layers=1, multimodal=True),
}


@pytest.mark.parametrize("method", METHODS)
def test_every_image_method_runs_on_interleaved_images_with_boundaries(vlm_factory, images, method):
    model = pv.apply(vlm_factory(connector="qformer"), METHODS[method]())
    model.image_boundaries = BOUNDARIES
    batch = model.tokenize(PROMPTS, [images, images[1]])
    types = seen_token_types(model, batch)
    assert int((types == IMAGE).sum()) == 4 * model.tokens_per_image
    assert model.generate(images=[images, images[1]], prompts=PROMPTS, max_new_tokens=2)


def test_boundaries_reach_training_samples_too(vlm_factory, images):
    from peft_vlm.data import SampleEncoder

    model = vlm_factory(connector="qformer")
    model.image_boundaries = BOUNDARIES
    sample = {"messages": [{"role": "user", "content": "<image> and <image>?"},
                           {"role": "assistant", "content": "red"}],
              "images": images[:2]}
    encoded = SampleEncoder.for_model(model)(sample)
    runs = image_runs(encoded["input_ids"])
    assert len(runs) == 2 and model.tokenizer.decode(encoded["input_ids"][runs[0][1]:runs[1][0]]) == "</img> and <img>"


SETUPS = {"perceiver_resampler": [pv.GatedCrossAttentionConfig(every=2)], "qformer": []}  # Flamingo, BLIP-2


@pytest.mark.parametrize("connector", SETUPS)
def test_setup_trains_with_the_lm_frozen_and_saves_and_loads_exactly(vlm_factory, images, tmp_path, connector):
    model = pv.apply(vlm_factory(connector=connector), *SETUPS[connector])
    trained = {name for name, p in model.language_model.named_parameters() if p.requires_grad}
    assert all(".gated_cross_attention." in name for name in trained) and (bool(trained) == bool(SETUPS[connector]))
    batch = model.tokenize(PROMPTS, [images, images[1]], answers=["a circle", "red"])
    losses = train_steps(model, batch, steps=6)
    assert losses[-1] < losses[0] - 0.1
    pv.save_adapter(model, tmp_path / "adapter")
    reloaded = pv.load_adapter(vlm_factory(connector=connector), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, model(**batch).logits)


@pytest.mark.parametrize("connector", ["perceiver_resampler", "qformer", "qformer_question"])
def test_summary_lists_the_connector_in_group_vision(vlm_factory, connector):
    model = vlm_factory(connector=connector)
    rows = {(row.method, row.group): row.parameters for row in pv.trainable_summary(model).rows}
    assert rows == {("connector", "vision"): sum(p.numel() for p in model.connector.parameters())}


def test_adapter_files_remember_the_image_boundaries(vlm_factory, tmp_path):
    model = vlm_factory(connector="qformer")
    model.image_boundaries = BOUNDARIES
    pv.save_adapter(model, tmp_path / "adapter")
    metadata, _ = pv.methods.adapter_file.read_adapter(tmp_path / "adapter")
    assert metadata["base_model"]["image_boundaries"] == list(BOUNDARIES)
    assert not {"image_boundaries", "vision_options"} & set(vlm_factory().base_spec())
