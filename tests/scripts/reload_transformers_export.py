"""Load an exported folder with plain transformers only (no peft_vlm) and write its logits and greedy tokens.

    python reload_transformers_export.py EXPORTED_DIR REQUEST.json OUTPUT.safetensors

REQUEST.json: {"texts": [...], "images": [png paths, ...], "max_new_tokens": n}. The exported processor prepares the
inputs; the output holds input_ids, logits and the new tokens of greedy `generate`.
"""
import json
import sys

import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

folder, request_path, output_path = sys.argv[1:4]
request = json.load(open(request_path))
model = AutoModelForImageTextToText.from_pretrained(folder).eval()
processor = AutoProcessor.from_pretrained(folder)
images = [Image.open(path).convert("RGB") for path in request["images"]] or None
inputs = processor(text=request["texts"], images=images, padding=True, return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits
    generated = model.generate(**inputs, max_new_tokens=request["max_new_tokens"], do_sample=False,
                               pad_token_id=processor.tokenizer.pad_token_id)
assert "peft_vlm" not in sys.modules, "the reload must not import peft_vlm"
save_file({"input_ids": inputs["input_ids"].contiguous(), "logits": logits.contiguous(),
           "new_tokens": generated[:, inputs["input_ids"].shape[1]:].contiguous()}, output_path)
