"""Examples -> one left-padded batch that `VisionLanguageModel.forward(**batch)` accepts.

Left padding matches generation (prompts end at the right edge); the model derives position ids from the attention
mask, so padding does not shift positions. Images are concatenated in example order, which is the reading order
the model splices them in.

With `packing=True` several examples share a row: whole examples (text and image tokens together, never cut) are
placed first-fit, longest first, into rows as wide as the batch's longest example, so a packed batch is never wider
than the unpacked one and has the same examples, only fewer rows. `sequence_ids` (rows, length) says which example
each position belongs to (-1: padding); the model turns it into per-sample position ids and a mask that keeps the
samples apart (`peft_vlm.runtime.packing`). Each example keeps its own labels (the answers); the label of its first
token is ignored, as it is unpacked, where nothing precedes it: packed, the previous sample's last token would
otherwise be trained to predict it.
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

    @property
    def num_tokens(self) -> int:
        """Positions holding a real token (not padding)."""
        return int(self["attention_mask"].sum()) if len(self) else 0

    @property
    def pad_share(self) -> float:
        """The share of the batch's positions that are padding (computed for nothing)."""
        return 1 - self.num_tokens / self["input_ids"].numel() if len(self) else 0.0


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

    def __init__(self, pad_token_id: int, packing: bool = False):
        if pad_token_id is None:
            raise ConfigError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its EOS token)")
        self.pad_token_id = pad_token_id
        self.packing = packing

    @classmethod
    def for_model(cls, model, packing: bool = False) -> "Collator":
        if hasattr(model, "collator"):  # a wrapped transformers VLM: its processor's outputs
            return model.collator(packing=packing) if packing else model.collator()
        return cls(model.tokenizer.pad_token_id, packing)

    def __call__(self, items: list) -> Batch:
        examples, batch = start_batch(items)
        if not examples:
            return batch
        if self.packing:
            return self._packed(examples, batch)
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

    def _packed(self, examples: list[dict], batch: Batch) -> Batch:
        rows = pack_rows([len(e["input_ids"]) for e in examples])
        ids, labels, sequences = [], [], []
        for row in rows:
            ids.append([token for i in row for token in examples[i]["input_ids"]])
            labels.append([label for i in row for label in [IGNORE_INDEX, *examples[i]["labels"][1:]]])
            sequences.append([i for i in row for _ in examples[i]["input_ids"]])
        batch["input_ids"], batch["attention_mask"] = pad_left(ids, self.pad_token_id)
        batch["labels"], _ = pad_left(labels, IGNORE_INDEX)
        batch["sequence_ids"], _ = pad_left(sequences, -1)
        # images in the packed reading order (row by row), which is the order the model splices them in
        owners = [(row, i) for row, members in enumerate(rows) for i in members
                  if examples[i].get("pixel_values") is not None for _ in examples[i]["pixel_values"]]
        if owners:
            batch["pixel_values"] = torch.cat([examples[i]["pixel_values"] for row in rows for i in row
                                               if examples[i].get("pixel_values") is not None])
            batch["image_rows"] = torch.tensor([row for row, _ in owners])
            batch["image_sequences"] = torch.tensor([i for _, i in owners])  # the example each image belongs to
        return batch


def pack_rows(lengths: list[int], capacity: int | None = None) -> list[list[int]]:
    """Indices of the examples in each row: first-fit decreasing into rows of `capacity` positions (default: the
    longest example). An example is never split; one longer than `capacity` gets a row of its own. Rows come
    longest example first; the examples within a row in their order."""
    capacity = capacity or max(lengths)
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= lengths[index]
    return [sorted(row) for row in rows]
