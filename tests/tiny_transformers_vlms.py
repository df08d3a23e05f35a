"""Tiny randomly initialised transformers VLMs (LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, Idefics3, PaliGemma, Gemma 3)
with their own processors, built from configs.

Each builder returns (model, processor); `save_tiny(name, folder)` writes both as a folder that
`pv.VisionLanguageModel.from_pretrained(folder)` (and plain `transformers`) loads.
"""
from __future__ import annotations

import torch
from transformers import (
    Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
    GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor, SiglipImageProcessor,
    SiglipVisionConfig,
    Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor, Idefics3Processor,
    LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessor, LlavaNextProcessor,
    CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
    Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor, Gemma3TextConfig,
    PreTrainedTokenizerFast,
    Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor,
)
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

from conftest import make_tokenizer

TEXT = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
LLAVA_CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{% for c in m['content'] %}"
              "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}</s>{% endfor %}"
              "{% if add_generation_prompt %}<|assistant|>{% endif %}")
QWEN_CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{% for c in m['content'] %}"
             "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}"
             "{% endif %}{% endfor %}</s>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _tokenizer(*special):
    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(special)})
    return tokenizer


def build_llava(seed: int = 0):
    tokenizer = _tokenizer("<image>")
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=16, patch_size=4, projection_dim=32)
    config = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**TEXT),
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    images = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=4,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_CHAT)
    return model, processor


def build_qwen2_vl(seed: int = 0, version: str = "2"):
    tokenizer = _tokenizer("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")
    ids = tokenizer.convert_tokens_to_ids
    text = {**TEXT, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 2, 4], "rope_theta": 10000.0}}
    vision = dict(depth=2, num_heads=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
    if version == "2":
        vision.update(embed_dim=32, hidden_size=64, mlp_ratio=2, in_chans=3)
        config_class, model_class, processor_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    else:  # Qwen2.5-VL: windowed attention in the tower, full attention in the listed blocks
        vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=64, window_size=8,
                      fullatt_block_indexes=[1])
        config_class, model_class = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        processor_class = Qwen2_5_VLProcessor
    config = config_class(
        text_config=text, vision_config=vision,
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = model_class(config).eval()
    images = Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2,
                                   min_pixels=16 * 16, max_pixels=16 * 16)
    videos = Qwen2VLVideoProcessor(patch_size=4, merge_size=2, temporal_patch_size=2)
    processor = processor_class(image_processor=images, tokenizer=tokenizer, video_processor=videos,
                                chat_template=QWEN_CHAT)
    return model, processor


def build_qwen2_5_vl(seed: int = 0):
    return build_qwen2_vl(seed, version="2.5")


def build_llava_next(seed: int = 0):
    tokenizer = _tokenizer("<image>")
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=16, patch_size=4, projection_dim=32)
    pinpoints = [[16, 16], [16, 32], [32, 16], [32, 32]]
    config = LlavaNextConfig(vision_config=vision, text_config=LlamaConfig(**TEXT), image_grid_pinpoints=pinpoints,
                             image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    images = LlavaNextImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                     image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=images, tokenizer=tokenizer, patch_size=4,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=LLAVA_CHAT)
    return model, processor


IDEFICS3_CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{% for c in m['content'] %}"
                 "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
                 "<end_of_utterance>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def build_idefics3(seed: int = 0):
    tokenizer = _tokenizer("<image>", "<fake_token_around_image>", "<end_of_utterance>", "<global-img>")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16,
                  patch_size=4)
    config = Idefics3Config(vision_config=vision, text_config=LlamaConfig(**TEXT), scale_factor=2,
                            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                            pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    images = Idefics3ImageProcessor(size={"longest_edge": 16}, max_image_size={"longest_edge": 16},
                                    do_image_splitting=False)
    processor = Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=4,
                                  chat_template=IDEFICS3_CHAT)
    return model, processor


def build_paligemma(seed: int = 0):
    tokenizer = _tokenizer("<image>")
    tokenizer.add_bos_token = True
    text = GemmaConfig(**{**TEXT, "head_dim": 16}, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=16, patch_size=4, projection_dim=64)
    config = PaliGemmaConfig(vision_config=vision, text_config=text, projection_dim=64,
                             image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config).eval()
    images = SiglipImageProcessor(size={"height": 16, "width": 16})
    images.image_seq_length = 16
    processor = PaliGemmaProcessor(image_processor=images, tokenizer=tokenizer)
    return model, processor


def build_gemma3(seed: int = 0):
    """Gemma 3: a SigLIP tower pooled to 4 soft tokens per image between <start_of_image> / <end_of_image>, one
    sliding-window and one global attention layer, bidirectional attention within each image (token_type_ids)."""
    base = _tokenizer("<start_of_image>", "<image_soft_token>", "<end_of_image>")
    named = {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>", extra_special_tokens=named)
    ids = tokenizer.convert_tokens_to_ids
    text = Gemma3TextConfig(**{**TEXT, "head_dim": 16}, sliding_window=8,
                            layer_types=["sliding_attention", "full_attention"], bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=16, patch_size=4)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                          image_token_index=ids("<image_soft_token>"), boi_token_index=ids("<start_of_image>"),
                          eoi_token_index=ids("<end_of_image>"))
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # initialised at zero, it would give every image the same features (the LM ignores them)
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.2)
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": 16, "width": 16}),
                                tokenizer=tokenizer, image_seq_length=4,
                                chat_template=LLAVA_CHAT.replace("<image>", "<start_of_image>"))
    return model, processor


BUILDERS = {"llava": build_llava, "qwen2_vl": build_qwen2_vl, "qwen2_5_vl": build_qwen2_5_vl,
            "llava_next": build_llava_next, "idefics3": build_idefics3, "paligemma": build_paligemma,
            "gemma3": build_gemma3}


def save_tiny(name: str, folder, seed: int = 0) -> str:
    model, processor = BUILDERS[name](seed)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def wrapped(name: str, seed: int = 0, **options):
    """The tiny model of `name` wrapped for peft_vlm."""
    from peft_vlm.model.transformers_vlm import TransformersVLM

    model, processor = BUILDERS[name](seed)
    return TransformersVLM(model, processor, **options).eval()


def pictures(count: int = 2, seed: int = 0):
    import numpy as np
    from PIL import Image

    generator = np.random.default_rng(seed)
    return [Image.fromarray(generator.integers(0, 256, (20, 20, 3), dtype=np.uint8)) for _ in range(count)]


def batch(model, answers: bool = True):
    """Two prompts with one image each (different lengths, so the shorter row is padded)."""
    prompts = ["What is in the picture?", "Describe the image in one sentence. Is there a shape?"]
    return model.tokenize(prompts, images=pictures(2), answers=["A red circle.", "Yes."] if answers else None)


def save_tiny_tower(kind: str, folder, seed: int = 0) -> str:
    """A tiny transformers vision model (CLIP, SigLIP, SigLIP 2 or DINOv2) and its image processor (16x16 images, 4x4
    patches; SigLIP 2's NaFlex processor takes up to 16 patches) in `folder`."""
    from transformers import (BitImageProcessor, CLIPVisionModel, Dinov2Config, Dinov2Model, Siglip2ImageProcessor,
                              Siglip2VisionConfig, Siglip2VisionModel, SiglipImageProcessor, SiglipVisionConfig,
                              SiglipVisionModel)

    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, patch_size=4)
    torch.manual_seed(seed)
    if kind == "clip":
        model = CLIPVisionModel(CLIPVisionConfig(**shape, image_size=16, projection_dim=32))
        processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    elif kind == "siglip":
        model = SiglipVisionModel(SiglipVisionConfig(**shape, image_size=16))
        processor = SiglipImageProcessor(size={"height": 16, "width": 16})
    elif kind == "siglip2":
        model = Siglip2VisionModel(Siglip2VisionConfig(**shape, num_patches=16))
        processor = Siglip2ImageProcessor(patch_size=4, max_num_patches=16)
    else:
        model = Dinov2Model(Dinov2Config(**{k: v for k, v in shape.items() if k != "intermediate_size"}, image_size=16))
        processor = BitImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)
