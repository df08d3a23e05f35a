"""The CogVLM visual expert: routing by token type, exactness at init and after training, counts, cache, positions."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, LlamaConfig

import peft_vlm as pv
from peft_vlm.model.connectors import build_connector
from peft_vlm.methods.visual_expert import ExpertLinear
from peft_vlm.model.vision_language_model import load_language_model
from peft_vlm.methods.presets import preset_card
from peft_vlm.data.prompting import IMAGE_TOKEN_ID
from peft_vlm.runtime.token_context import IMAGE
from peft_vlm.runtime.tracking import state_of
from conftest import assert_cached_generation_matches_full_decoding

EXPERTS = {"full": {}, "low_rank": {"rank": 4}}
VICUNA_7B = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32,
)


def logits(model, batch, **kwargs):
    with torch.no_grad():
        return model(**batch, **kwargs).logits


def expert_parameters(model):
    return [p for entry in state_of(model).methods() for ps in entry.parameters.values() for p in ps]


def perturb_experts(model, scale=0.05):
    """Stand-in for training: move every expert weight away from its start."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in expert_parameters(model):
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


def image_batch(model, images):
    return model.tokenize(["What is in the picture?", "<image> and <image> compared"], [images[0], images[1:3]])


def meta_7b():
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(LlamaConfig(**VICUNA_7B))


@pytest.mark.parametrize("expert", EXPERTS)
def test_logits_at_init_equal_the_base_exactly_on_text_and_on_images(vlm_factory, images, expert):
    base, model = vlm_factory(), vlm_factory()
    pv.apply(model, pv.VisualExpertConfig(**EXPERTS[expert]))
    for batch in (base.tokenize(["Describe the colour.", "Hi"]), image_batch(base, images)):
        assert (logits(model, batch) - logits(base, batch)).abs().max() == 0


@pytest.mark.parametrize("expert", EXPERTS)
def test_after_training_text_logits_stay_exactly_the_base_while_image_logits_change(vlm_factory, images, expert):
    base, model = vlm_factory(), vlm_factory()
    pv.apply(model, pv.VisualExpertConfig(**EXPERTS[expert]))
    train_batch = model.tokenize(["What is in the picture?", "Shape?"], images[:2], answers=["a red circle", "square"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        model(**train_batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    text = base.tokenize(["The capital of France is", "Describe the image in one sentence."])
    assert (logits(model, text) - logits(base, text)).abs().max() == 0
    with_images = image_batch(base, images)
    assert (logits(model, with_images) - logits(base, with_images)).abs().max() > 1e-3


def test_text_only_calls_run_the_frozen_path_alone(vlm_factory, images):
    model = pv.apply(vlm_factory(), pv.VisualExpertConfig())
    calls = []
    for module in model.modules():
        if isinstance(module, ExpertLinear):
            module.expert.register_forward_hook(lambda *args: calls.append(1))
    logits(model, model.tokenize(["Describe the colour."]))
    assert calls == []
    logits(model, image_batch(model, images))
    assert len(calls) == 2 * 7  # two layers, seven projections each


def test_full_expert_weights_start_as_trainable_copies_of_the_frozen_lm_weights(lm_factory):
    model = pv.apply(lm_factory(), pv.VisualExpertConfig())
    q_proj = model.model.layers[1].self_attn.q_proj
    assert torch.equal(q_proj.expert.weight, q_proj.base.weight)
    assert q_proj.expert.weight.data_ptr() != q_proj.base.weight.data_ptr()
    assert q_proj.expert.weight.requires_grad and not q_proj.base.weight.requires_grad


def test_low_rank_expert_adds_a_and_zero_b_per_projection(lm_factory):
    model = pv.apply(lm_factory(), pv.VisualExpertConfig(rank=4))
    down_proj = model.model.layers[0].mlp.down_proj
    assert down_proj.expert.A.shape == (4, 128) and down_proj.expert.B.shape == (64, 4)
    assert not down_proj.expert.B.any() and down_proj.expert.A.any()
    assert sorted(name for name, _ in down_proj.named_parameters()) == ["base.weight", "expert.A", "expert.B"]


def test_expert_weights_are_in_group_vision_unless_another_group_is_named(lm_factory):
    assert pv.trainable_summary(pv.apply(lm_factory(), pv.VisualExpertConfig())).by_group().keys() == {"vision"}
    summary = pv.trainable_summary(pv.apply(lm_factory(), pv.VisualExpertConfig(rank=2, group="expert")))
    assert summary.by_group().keys() == {"expert"}


def test_only_the_named_layers_get_an_expert(lm_factory):
    model = pv.apply(lm_factory(), pv.VisualExpertConfig(layers=[1]))
    assert not isinstance(model.model.layers[0].self_attn.q_proj, ExpertLinear)
    assert all(
        isinstance(getattr(model.model.layers[1].mlp, n), ExpertLinear) for n in ("gate_proj", "up_proj", "down_proj")
    )
    with pytest.raises(pv.ConfigError, match=r"layers \[5\] do not exist; the model has 2 layers"):
        pv.apply(lm_factory(), pv.VisualExpertConfig(layers=[5]))


def test_bare_lm_treats_every_token_as_text_unless_token_types_are_given(lm_factory):
    base, model = lm_factory(), pv.apply(lm_factory(), pv.VisualExpertConfig())
    perturb_experts(model)
    input_ids = torch.randint(4, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": input_ids}
    assert (logits(model, batch) - logits(base, batch)).abs().max() == 0
    types = torch.zeros_like(input_ids)
    types[:, 4:8] = IMAGE
    with pv.token_types(model, types):
        routed = logits(model, batch)
    difference = (routed - logits(base, batch)).abs().amax(-1)
    assert difference[:, :4].max() == 0 and difference[:, 4:].min() > 0  # causal: only image positions and after


def test_full_expert_on_the_7b_configuration_adds_the_papers_6_5b_parameters():
    model = pv.apply(meta_7b(), pv.VisualExpertConfig())
    per_layer = 4 * 4096 * 4096 + 3 * 4096 * 11008
    assert pv.trainable_summary(model).trainable_parameters == 32 * per_layer == 6_476_005_376


def test_low_rank_expert_on_the_7b_configuration_adds_twenty_million_parameters_at_rank_8():
    model = pv.apply(meta_7b(), pv.VisualExpertConfig(rank=8))
    per_layer = 4 * 8 * (4096 + 4096) + 3 * 8 * (4096 + 11008)
    assert pv.trainable_summary(model).trainable_parameters == 32 * per_layer == 19_988_480


@pytest.mark.parametrize(
    "options", [{}, {"rank": 4}, {"shared_image_position": True}, {"rank": 4, "shared_image_position": True}]
)
def test_cached_greedy_generation_equals_uncached(vlm_factory, images, options):
    model = pv.apply(vlm_factory(), pv.VisualExpertConfig(**options))
    perturb_experts(model, scale=0.2)
    batch = image_batch(model, images)
    assert_cached_generation_matches_full_decoding(model, batch, steps=6)


def test_shared_image_position_gives_each_image_one_position_and_text_counts_on(vlm_factory, images):
    model = pv.apply(vlm_factory(), pv.VisualExpertConfig(shared_image_position=True))
    seen = {}
    model.language_model.model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    batch = model.tokenize(["<image><image> compare", "Hi"], [images[:2], None])
    logits(model, batch)
    expected = []
    for row, real in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
        positions, position, image_tokens = [], -1, 0
        for token, is_real in zip(row, real):
            image_tokens = image_tokens + 1 if token == IMAGE_TOKEN_ID else 0
            position += is_real and (image_tokens == 0 or (image_tokens - 1) % model.tokens_per_image == 0)
            positions.append(max(position, 0))
        expected.append(positions)
    assert seen["position_ids"].tolist() == expected
    image_positions = seen["position_ids"][0][batch["input_ids"][0] == IMAGE_TOKEN_ID]
    assert image_positions.unique().tolist() == [image_positions[0], image_positions[0] + 1]  # two adjacent images


def test_shared_image_position_leaves_text_only_logits_exactly_the_base(vlm_factory):
    base, model = vlm_factory(), pv.apply(vlm_factory(), pv.VisualExpertConfig(shared_image_position=True))
    batch = base.tokenize(["Describe the colour.", "Hi"])
    assert (logits(model, batch) - logits(base, batch)).abs().max() == 0


class OperatorLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("expert", EXPERTS)
def test_each_projection_path_runs_on_its_own_positions_only(lm_factory, expert):
    model = pv.apply(lm_factory(), pv.VisualExpertConfig(**EXPERTS[expert]))
    perturb_experts(model)
    wrapped = model.model.layers[0].mlp.up_proj
    assert isinstance(wrapped, ExpertLinear)
    x = torch.randn(2, 10, wrapped.base.in_features, generator=torch.Generator().manual_seed(2))
    types = (torch.arange(10) % 3 == 0).long().expand(2, 10)
    with pv.token_types(model, types):
        model(input_ids=torch.zeros(2, 10, dtype=torch.long))  # makes `types` the current call's token types
        with FlopCounterMode(display=False) as flops:
            routed = wrapped(x)
    if expert == "full":
        image_path = torch.nn.functional.linear(x, wrapped.expert.weight)
        assert flops.get_total_flops() == 2 * x[..., 0].numel() * wrapped.base.in_features * wrapped.base.out_features
    else:
        image_path = wrapped.base(x) + x @ wrapped.expert.A.T @ wrapped.expert.B.T * wrapped.expert.scale
    dense = torch.where((types == IMAGE).unsqueeze(-1), image_path, wrapped.base(x))
    torch.testing.assert_close(routed, dense)
    assert torch.equal(routed[types == 0], wrapped.base(x)[types == 0])


@pytest.mark.parametrize("expert", EXPERTS)
def test_routing_syncs_once_per_call_and_selects_nothing_by_mask(lm_factory, expert):
    base, model = lm_factory(), pv.apply(lm_factory(), pv.VisualExpertConfig(**EXPERTS[expert]))
    input_ids = torch.randint(4, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    types = (torch.arange(10) % 3 == 0).long().expand(2, 10)
    with OperatorLog() as base_ops:
        base(input_ids=input_ids).logits.sum().backward()
    with pv.token_types(model, types), OperatorLog() as expert_ops:
        model(input_ids=input_ids).logits.sum().backward()
    syncs = expert_ops.counts.get("_local_scalar_dense", 0) - base_ops.counts.get("_local_scalar_dense", 0)
    assert syncs == 1  # the image count, read once for all 14 wrapped projections
    added = set(expert_ops.counts) - set(base_ops.counts)
    assert {"index_select", "sort"} <= added
    assert not added & {"nonzero", "index", "index_put", "index_put_", "masked_scatter", "masked_select", "where"}


def test_adapter_file_round_trip_restores_image_conditioned_logits(vlm_factory, images, tmp_path):
    model = pv.apply(vlm_factory(), pv.VisualExpertConfig(rank=4, shared_image_position=True))
    perturb_experts(model)
    pv.save_adapter(model, tmp_path / "expert")
    loaded = pv.load_adapter(vlm_factory(), tmp_path / "expert")
    batch = image_batch(model, images)
    assert torch.equal(logits(loaded, batch), logits(model, batch))


def test_full_expert_on_a_4bit_base_is_refused_and_low_rank_trains(lm_factory, tmp_path):
    lm_factory().save_pretrained(tmp_path / "lm")
    with pytest.raises(pv.ConfigError, match="quantized.*VisualExpertConfig\\(rank=r\\)"):
        pv.apply(load_language_model(str(tmp_path / "lm"), load_in_4bit=True), pv.VisualExpertConfig())
    model = pv.apply(load_language_model(str(tmp_path / "lm"), load_in_4bit=True), pv.VisualExpertConfig(rank=4))
    input_ids = torch.randint(4, 300, (1, 8), generator=torch.Generator().manual_seed(0))
    with pv.token_types(model, (torch.arange(8) < 4).long()[None]):
        model(input_ids=input_ids, labels=input_ids).loss.backward()
    assert all(p.grad is not None for p in expert_parameters(model)[1::2])  # every B gets a gradient
    per_layer = 2 * 4 * (64 + 64) + 2 * 4 * (64 + 32) + 3 * 4 * (64 + 128)  # q and o, k and v (2 kv heads), MLP
    assert pv.trainable_summary(model).trainable_parameters == 2 * per_layer


def test_visual_expert_after_lora_on_the_same_projections_is_a_clear_error(lm_factory):
    import peft

    model = pv.apply(lm_factory(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(pv.ConfigError, match="layer 0 self_attn has no linear q_proj.*before methods that wrap"):
        pv.apply(model, pv.VisualExpertConfig())


@pytest.mark.parametrize("preset, options", [("cogvlm-expert", {"rank": None}), ("cogvlm-expert-lowrank", {"rank": 8})])
def test_presets_apply_the_visual_expert_and_have_cards(vlm_factory, preset, options):
    model = pv.apply(vlm_factory(), preset)
    entry = state_of(model).methods()[0]
    assert entry.name == "visual_expert" and entry.config.rank == options["rank"]
    assert "CogVLM" in preset_card(preset)


def test_downsample_connector_quarters_the_visual_tokens_by_merging_2x2_blocks(vlm_factory, images):
    model = vlm_factory(connector="downsample2x2_mlp")
    assert model.vision_tower.num_tokens == 16 and model.tokens_per_image == 4
    assert model.encode_images(torch.stack(images)).shape == (3, 4, model.config.hidden_size)
    connector = build_connector("downsample2x2_mlp", 8, 16)
    patches = torch.randn(1, 16, 8)
    changed = patches.clone()
    changed[0, 5] += 1  # row 1, column 1 of the 4x4 grid: inside the first 2x2 block
    with torch.no_grad():
        moved = (connector(changed) - connector(patches)).abs().amax(-1)[0]
    assert moved[0] > 0 and not moved[1:].any()


@pytest.mark.parametrize("num_patches", [15, 9])
def test_downsample_connector_refuses_a_grid_that_is_not_square_with_an_even_side(num_patches):
    with pytest.raises(pv.ConfigError, match=f"square patch grid with an even side.*gives {num_patches} patch tokens"):
        build_connector("downsample2x2_mlp", 8, 16).num_output_tokens(num_patches)
