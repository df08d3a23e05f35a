"""Evaluation reuses a frozen tower's features: the describe pass and the answer pass of one image run the tower
once, with the same answers as without the cache."""
import pytest
from PIL import Image

from peft_vlm.data.answer_protocol import AnswerProtocol
from peft_vlm.evaluation.vqa import Question, vqa_accuracy
from peft_vlm.model.vision_feature_cache import VisionFeatureCache

TWO_PASSES = AnswerProtocol(describe_first=True, describe_max_new_tokens=3, max_new_tokens=2)


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_VLM_CACHE", str(tmp_path / "home"))


def questions():
    red, blue = Image.new("RGB", (32, 32), (220, 30, 30)), Image.new("RGB", (32, 32), (30, 30, 220))
    return [Question(text, "red", image) for image in (red, blue) for text in ("What colour?", "Which shape?")]


def images_through_tower(model):
    seen = []
    model.vision_tower.register_forward_hook(lambda module, args, output: seen.append(len(args[0])))
    return seen


@pytest.mark.parametrize("setting", [None, True])
def test_the_describe_pass_and_the_answer_pass_run_the_tower_once_per_image(vlm_factory, setting):
    model = vlm_factory()
    seen = images_through_tower(model)
    plain = vqa_accuracy(model, questions(), protocol=TWO_PASSES, cache_vision_features=False)
    assert sum(seen) == 2 + 4  # each image described, then each of its two questions answered
    seen.clear()
    cached = vqa_accuracy(model, questions(), protocol=TWO_PASSES, cache_vision_features=setting)
    assert sum(seen) == 2
    assert cached.examples == plain.examples
    assert model.vision_feature_cache is None  # the evaluation's own cache does not outlive it


def test_a_cache_the_model_holds_serves_the_evaluation(vlm_factory, tmp_path):
    model = vlm_factory()
    model.vision_feature_cache = cache = VisionFeatureCache(tmp_path / "features")
    vqa_accuracy(model, questions(), protocol=TWO_PASSES)
    assert cache.stats["misses"] == 2 and cache.stats["memory_hits"] == 4
    assert model.vision_feature_cache is cache
