"""Training data: readers for LLaVA / caption / COCO / Alpaca files, image preprocessing, answer-only labels,
bad-row reports, and a collator for `VisionLanguageModel.forward`.

    encoder = SampleEncoder.for_model(model, resize="resize", max_length=1024)
    dataset = open_dataset("llava_instruct.json", "llava", encoder, bad_samples="skip", image_root="coco/train2017")
    print(dataset.validate().summary())               # optional: find every bad row before training
    loader = DataLoader(dataset, batch_size=8, collate_fn=Collator.for_model(model))
"""
from peft_vlm.data.collate import Batch, Collator
from peft_vlm.data.dataset import SampleDataset, StreamingSamples, open_dataset, shuffled_order
from peft_vlm.data.encoding import SampleEncoder
from peft_vlm.data.formats import (
    CAPTION_PROMPT,
    FORMATS,
    Records,
    SampleList,
    read_alpaca,
    read_captions,
    read_coco_captions,
    read_dataset,
    read_llava,
)
from peft_vlm.data.images import RESIZE_MODES, ImageProcessor, load_image
from peft_vlm.data.report import POLICIES, BadSamplePolicy, DataReport, Skipped

__all__ = [
    "CAPTION_PROMPT", "FORMATS", "POLICIES", "RESIZE_MODES", "BadSamplePolicy", "Batch", "Collator", "DataReport",
    "ImageProcessor", "Records", "SampleDataset", "SampleEncoder", "SampleList", "Skipped", "StreamingSamples",
    "load_image", "open_dataset", "read_alpaca", "read_captions", "read_coco_captions", "read_dataset", "read_llava",
    "shuffled_order",
]
