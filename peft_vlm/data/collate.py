"""Examples -> one left-padded batch that `VisionLanguageModel.forward(**batch)` accepts.

Left padding matches generation (prompts end at the right edge); the model derives position ids from the attention
mask, so padding does not shift positions. Images are concatenated in example order, which is the reading order
the model splices them in.
"""
from __future__ import annotations

import torch
from torch.utils.data import get_worker_info

from peft_vlm.data.report import Skipped
from peft_vlm.errors import ConfigError
from peft_vlm.data.prompting import IGNORE_INDEX, pad_left


class Batch(dict):
    """The model's inputs as dict items; where each row came from, and what was skipped, as attributes (so that
    `model(**batch)` sees inputs only)."""

    sources: list[str]
    skipped: list  # DataErrors of rows left out under policy "skip"
    fatal: list  # DataErrors of a policy-"error" dataset met in a worker; `DataReport.add_batch` raises them
    truncated: list[str]

    @property
    def num_answer_tokens(self) -> int:
        return int((self["labels"] != IGNORE_INDEX).sum()) if len(self) else 0


def start_batch(items: list) -> tuple[list[dict], Batch]:
    """(the examples, an empty Batch that lists where they came from and what was skipped); a fatal bad row is
    raised here in the main process (a DataLoader worker passes it on for `DataReport.add_batch`)."""
    examples = [item for item in items if not isinstance(item, Skipped)]
    batch = Batch()
    batch.skipped = [item.error for item in items if isinstance(item, Skipped) and not item.fatal]
    batch.fatal = [item.error for item in items if isinstance(item, Skipped) and item.fatal]
    if batch.fatal and get_worker_info() is None:
        raise batch.fatal[0]
    batch.sources = [example["source"] for example in examples]
    batch.truncated = [example["source"] for example in examples if example.get("truncated")]
    return examples, batch


class Collator:
    """`collate_fn` for a DataLoader over a SampleDataset; `Skipped` markers are dropped and listed in
    `batch.skipped`. A batch of skipped rows only has no model inputs (`len(batch) == 0`)."""

    def __init__(self, pad_token_id: int):
        if pad_token_id is None:
            raise ConfigError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its EOS token)")
        self.pad_token_id = pad_token_id

    @classmethod
    def for_model(cls, model) -> "Collator":
        if hasattr(model, "collator"):  # a wrapped transformers VLM: its processor's outputs
            return model.collator()
        return cls(model.tokenizer.pad_token_id)

    def __call__(self, items: list) -> Batch:
        examples, batch = start_batch(items)
        if not examples:
            return batch
        batch["input_ids"], batch["attention_mask"] = pad_left([e["input_ids"] for e in examples], self.pad_token_id)
        batch["labels"], _ = pad_left([e["labels"] for e in examples], IGNORE_INDEX)
        pixels = [e["pixel_values"] for e in examples if e.get("pixel_values") is not None]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
            # the row of each image, for methods that take images outside the token sequence
            batch["image_rows"] = torch.tensor(
                [row for row, e in enumerate(examples) if e.get("pixel_values") is not None for _ in e["pixel_values"]]
            )
        return batch
