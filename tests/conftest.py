"""Tiny randomly initialised models built from configs: no hub, seconds on two CPU cores."""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, PreTrainedTokenizerFast, Qwen2Config

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "What is in the picture? A red circle. A blue square. A green triangle.",
    "Is there a shape? Yes. No. The colour is red, blue, green, yellow, gray, black, teal, brown.",
    "The capital of France is Paris. Describe the image in one sentence.",
] * 4

TINY_LM = dict(
    vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
)
CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
TINY_VIT = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 48, "patch_size": 8, "head_width": 24},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


def make_tokenizer():
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(CORPUS, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


def make_lm(model_type: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = CONFIGS[model_type](**{**TINY_LM, **overrides})
    config._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture
def lm_factory():
    return make_lm


def register_tiny_vit(folder) -> str:
    import open_clip

    path = folder / "test-tiny-vit.json"
    path.write_text(json.dumps(TINY_VIT))
    open_clip.add_model_config(str(path))
    return "test-tiny-vit"


def make_vlm(tokenizer, vision, model_type="llama", seed=0, connector="mlp2x_gelu", **overrides):
    import peft_vlm as pv

    lm = make_lm(model_type, seed, **overrides)
    torch.manual_seed(seed + 1)
    return pv.VisionLanguageModel.from_pretrained(llm=lm, tokenizer=tokenizer, vision=vision,
                                                  connector=connector).eval()


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory):
    return register_tiny_vit(tmp_path_factory.mktemp("open_clip"))


@pytest.fixture
def vlm_factory(tokenizer, tiny_vit):
    def build(model_type="llama", seed=0, connector="mlp2x_gelu", **overrides):
        return make_vlm(tokenizer, tiny_vit, model_type, seed, connector, **overrides)

    return build


@pytest.fixture
def images():
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(3, 32, 32, generator=generator) for _ in range(3)]


LLAMA_7B = dict(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, vocab_size=32000,
)


@pytest.fixture
def llama_7b_meta():
    """LLaMA-7B's configuration built on the meta device: parameter counts without weights."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA_7B))


def assert_cached_generation_matches_full_decoding(model, batch, steps):
    """Greedy `generate` with the KV cache gives the tokens of greedy decoding by full forward passes."""
    cached = model.generate_ids(**batch, max_new_tokens=steps, min_new_tokens=steps)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    images = {key: batch[key] for key in ("pixel_values", "image_rows") if key in batch}
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **images).logits
            next_token = logits[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, next_token], 1), torch.cat([mask, torch.ones_like(next_token)], 1)
    assert cached.tolist() == ids[:, batch["input_ids"].shape[1]:].tolist()


def train_steps(model, batch, steps, lr=3e-3):
    """AdamW steps on one fixed batch; the losses seen, then the model back in eval mode."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses
