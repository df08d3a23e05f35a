"""Training examples from a lazy sequence of samples, with the bad-sample policy applied.

Two ways to read, both lazy (a row is read, and its images opened, only when it is encoded):
- by index: `len(dataset)`, `dataset[i]`, and `dataset.iter_from(position, order)` for a seeded, resumable order
  (`shuffled_order(len(dataset), seed, epoch)` gives one; resuming at a position replays nothing and skips nothing);
- by streaming: `dataset.stream()`, an IterableDataset in file order that needs no index, sharded over DataLoader
  workers.

A bad row raises `DataError` under policy "error". Under "skip", `dataset[i]` gives a `Skipped` marker, so
positions stay stable and the reason travels back from DataLoader workers through the collated batch: call
`report.add_batch(batch)` for every batch (it also raises, in the main process, a policy-"error" bad row that a
worker met). `iter_from` and `validate` record into `dataset.report` themselves.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from peft_vlm.data.encoding import SampleEncoder
from peft_vlm.data.formats import CAPTION_PROMPT, read_dataset
from peft_vlm.data.report import DataReport, Skipped, check_policy
from peft_vlm.errors import ConfigError, DataError

TOO_MANY_SKIPPED = "too many bad rows skipped"


def shuffled_order(length: int, seed: int, epoch: int = 0) -> list[int]:
    """The same permutation for the same (seed, epoch) on every machine and every resume."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(length, generator=generator).tolist()


class SampleDataset(Dataset):
    def __init__(self, records, encoder: SampleEncoder, bad_samples: str = "error", report: DataReport | None = None,
                 max_skipped_share: float = 0.05):
        """`max_skipped_share`: under policy "skip", the share of rows a training run may skip before it stops
        (`check_skipped`)."""
        if not 0 <= max_skipped_share <= 1:
            raise ConfigError(f"max_skipped_share={max_skipped_share!r} must be a share between 0 and 1")
        self.records = records  # Records, SampleList or anything with len, [i] and stream()
        self.encoder = encoder
        self.policy = check_policy(bad_samples)
        self.report = report if report is not None else DataReport()
        self.max_skipped_share = max_skipped_share

    @property
    def source_file(self):
        """The data file the rows are read from, or None (rows given in memory)."""
        return getattr(getattr(self.records, "file", None), "path", None)

    def skip_error(self, lost_batch: bool = False) -> DataError | None:
        """Under policy "skip", the error that stops a run (naming the file and the first bad rows, with the skip
        report) when a whole batch was lost, or when more than `max_skipped_share` of the rows have been skipped
        (of the dataset's rows, or of the rows seen once it has been read more than once): a run must not quietly
        train on a fraction of its data. None while the run may go on."""
        report = self.report
        if self.policy != "skip" or not report:
            return None
        if lost_batch or report.num_bad > self.max_skipped_share * max(report.seen, len(self)):
            file = self.source_file
            why = "every row of a batch" if lost_batch else f"more than {100 * self.max_skipped_share:g}% of the rows"
            return DataError(str(file or report.bad[0].source), TOO_MANY_SKIPPED,
                             f"{why} skipped as bad (data.max_skipped_share); {report.summary(max_rows=5)}")
        return None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict | Skipped:
        try:
            sample = self.records[index]
        except DataError as error:
            sample = error
        return self.encode(sample)

    def encode(self, sample: dict | DataError, encode=None) -> dict | Skipped:
        """Apply the policy to one sample (or to the DataError its row gave)."""
        try:
            if isinstance(sample, DataError):
                raise sample
            return (encode or self.encoder)(sample)
        except DataError as error:
            if self.policy == "error" and get_worker_info() is None:
                raise
            return Skipped(error, fatal=self.policy == "error")

    def _record(self, item: dict | Skipped) -> dict | None:
        self.report.seen += 1
        if isinstance(item, Skipped):
            self.report.add_bad(item.error)
            return None
        if item["truncated"]:
            self.report.add_truncated(item["source"])
        return item

    def iter_from(self, start: int = 0, order: Sequence[int] | None = None) -> Iterator[tuple[int, dict]]:
        """(position, example) for positions `start`, `start + 1`, ... of `order` (default: file order); skipped
        rows use up their position, so a run resumed at a saved position sees exactly what it would have seen."""
        order = range(len(self)) if order is None else order
        for position in range(start, len(order)):
            item = self._record(self[order[position]])
            if item is not None:
                yield position, item

    def stream(self) -> "StreamingSamples":
        return StreamingSamples(self)

    def validate(self, load_images: bool = False) -> DataReport:
        """Encode every row once (text only unless `load_images`) to find bad rows before training."""
        encode = self.encoder if load_images else self.encoder.encode_text
        for _, sample in self.records.stream():
            self._record(self.encode(sample, encode))
        return self.report


def open_dataset(path, format: str, encoder: SampleEncoder, bad_samples: str = "error", image_root=None,
                 caption_prompt: str = CAPTION_PROMPT, report: DataReport | None = None,
                 max_skipped_share: float = 0.05) -> SampleDataset:
    """A data file in one of the known formats (see `read_dataset`), ready to train on; image paths in it are
    relative to the file's own folder unless `image_root` is given."""
    records = read_dataset(path, format, image_root=image_root, caption_prompt=caption_prompt)
    return SampleDataset(records, encoder, bad_samples, report, max_skipped_share)


class StreamingSamples(IterableDataset):
    """File order without a random-access index; each DataLoader worker takes every n-th row."""

    def __init__(self, dataset: SampleDataset):
        self.dataset = dataset

    def __iter__(self) -> Iterator[dict | Skipped]:
        worker = get_worker_info()
        shard, shards = (worker.id, worker.num_workers) if worker else (0, 1)
        for index, sample in self.dataset.records.stream():
            if index % shards == shard:
                yield self.dataset.encode(sample)
