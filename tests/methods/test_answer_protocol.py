"""The answer protocol travels with the adapter: saved in the file, restored on load, used by `generate`."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import peft_vlm as pv
from peft_vlm.data.answer_protocol import AnswerProtocol
from peft_vlm.data.formats import CAPTION_PROMPT
from peft_vlm.evaluation.vqa import Question, vqa_accuracy

TWO_PASSES = AnswerProtocol(describe_first=True, describe_max_new_tokens=3, answer_after="so", max_new_tokens=4,
                            precision="no")


@pytest.fixture
def adapted(vlm_factory):
    model = pv.apply(vlm_factory(), pv.BiasScaleConfig())
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.01 * torch.randn_like(parameter))
    return model


def test_protocol_round_trips_through_the_adapter_file_and_info_shows_it(adapted, vlm_factory, tmp_path):
    adapted.answer_protocol = TWO_PASSES
    path = pv.save_adapter(adapted, tmp_path / "adapter")
    with safe_open(str(path), framework="pt") as handle:
        assert json.loads(handle.metadata()["answer_protocol"]) == TWO_PASSES.to_dict()
    fresh = pv.load_adapter(vlm_factory(), path)
    assert fresh.answer_protocol == TWO_PASSES
    assert "answer protocol: two passes: describe ('Describe the image briefly.', 3 tokens)" in pv.describe_adapter(
        path)


def test_an_adapter_without_a_protocol_loads_and_answers_in_one_plain_pass(adapted, vlm_factory, tmp_path, images):
    path = pv.save_adapter(adapted, tmp_path / "adapter")  # as files written before protocols were recorded
    with safe_open(str(path), framework="pt") as handle:
        assert "answer_protocol" not in handle.metadata()
    fresh = pv.load_adapter(vlm_factory(), path)
    assert fresh.answer_protocol is None
    assert "none recorded (one plain pass)" in pv.describe_adapter(path)
    assert fresh.generate(images=images[:1], prompts=["What colour?"], max_new_tokens=3) == adapted.generate(
        images=images[:1], prompts=["What colour?"], max_new_tokens=3, protocol=False)


@pytest.mark.parametrize("protocol, complaint", [
    ('{"describe_first": "yes"}', "describe_first='yes' is not valid"),
    ('{"stop_after": 3}', "unknown option(s) stop_after"),
    ('{"template": "{question} only"}', "template must hold {description} and {question}"),
    ('{"max_new_tokens": 0}', "max_new_tokens must be an integer in [1, 4096]"),
    ('{"precision": "fp8"}', "precision='fp8' is not valid"),
    ('[1, 2]', "must be a JSON object"),
])
def test_a_malformed_protocol_is_refused_naming_the_field_and_the_model_is_untouched(
        adapted, vlm_factory, tmp_path, protocol, complaint):
    path = pv.save_adapter(adapted, tmp_path / "adapter")
    with safe_open(str(path), framework="pt") as handle:
        metadata, tensors = handle.metadata(), {key: handle.get_tensor(key) for key in handle.keys()}
    save_file(tensors, str(path), metadata={**metadata, "answer_protocol": protocol})
    fresh = vlm_factory()
    before = {name: p.clone() for name, p in fresh.named_parameters()}
    with pytest.raises(pv.AdapterFileError, match="metadata field 'answer_protocol'") as error:
        pv.load_adapter(fresh, path)
    assert complaint in str(error.value)
    assert all(torch.equal(before[name], p) for name, p in fresh.named_parameters())


def test_generate_with_a_describe_first_protocol_answers_after_its_own_description(adapted, images):
    """Two passes: the model's greedy description, then the question after it as the protocol's template says;
    the answer is what follows `answer_after` (all of it when the marker is missing)."""
    adapted.answer_protocol = TWO_PASSES
    questions = ["What colour?", "Which shape?"]
    descriptions = adapted.generate(images=images[:2], prompts=[CAPTION_PROMPT] * 2, max_new_tokens=3,
                                    protocol=False)
    described = [TWO_PASSES.question_after(d, q) for d, q in zip(descriptions, questions)]
    raw = adapted.generate(images=images[:2], prompts=described, max_new_tokens=4, protocol=False)
    assert adapted.generate(images=images[:2], prompts=questions) == [TWO_PASSES.answer_in(r) for r in raw]
    assert TWO_PASSES.answer_in("a red circle so yes") == "yes" and TWO_PASSES.answer_in("yes") == "yes"
    plain = adapted.generate(images=images[:2], prompts=questions, protocol=False, max_new_tokens=4)
    assert plain == adapted.generate(images=images[:2], prompts=questions, protocol=AnswerProtocol(max_new_tokens=4))


def test_vqa_accuracy_answers_by_the_models_protocol_unless_told_otherwise(adapted, images, monkeypatch):
    asked = []
    original = type(adapted).generate

    def generate(self, images=None, prompts=(), **options):
        asked.append(list(prompts))
        return original(self, images=images, prompts=prompts, **options)

    monkeypatch.setattr(type(adapted), "generate", generate)
    questions = [Question("What colour?", "red", images[0], "color")]
    adapted.answer_protocol = TWO_PASSES
    vqa_accuracy(adapted, questions)
    assert asked[0] == [CAPTION_PROMPT] and asked[1][0].startswith("The image shows ")
    asked.clear()
    vqa_accuracy(adapted, questions, protocol=False)
    assert asked == [["What colour?"]]


def test_a_recipe_records_the_protocol_its_evaluation_and_data_use():
    from peft_vlm.recipes import answer_protocol

    described = {"name": "r", "data": {"instructions": {"format": "easy_vqa", "options": {"describe_first": True}}},
                 "train": {"mixed_precision": "bf16-native"}}
    assert answer_protocol(described) == AnswerProtocol(describe_first=True, max_new_tokens=8, precision="bf16-native")
    one_pass = {**described, "eval": {"describe_first": False, "answer_after": "Answer:", "max_new_tokens": 16}}
    assert answer_protocol(one_pass) == AnswerProtocol(answer_after="Answer:", max_new_tokens=16,
                                                       precision="bf16-native")
