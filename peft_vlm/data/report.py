"""What happened to the rows of a dataset: which were bad, why, and what the bad-sample policy did with them.

A row that cannot be trained on (no answer left after truncation, labels that do not line up with the answer text,
an image that does not open, ...) is never trained on silently: with policy "error" the first one stops the run
with a `DataError` naming file, row and reason; with policy "skip" it is left out and listed here.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Literal

from peft_vlm.errors import ConfigError, DataError

BadSamplePolicy = Literal["error", "skip"]
POLICIES = ("error", "skip")

# Reasons a row is bad; `DataError.reason` is one of these.
INVALID_JSON = "invalid JSON"
WRONG_SCHEMA = "wrong schema"
NO_ANSWER = "no assistant answer"
MISSING_IMAGE = "missing image file"
UNREADABLE_IMAGE = "unreadable image"
IMAGE_TOO_LARGE = "image too large"
TOO_LONG = "too long: answer truncated away by max_length"
MISALIGNED = "misaligned tokenization"


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ConfigError(f"bad_samples={policy!r} is not a policy; use one of {', '.join(POLICIES)}")
    return policy


@dataclass(frozen=True)
class Skipped:
    """Stands in for a skipped row so that positions stay stable and DataLoader workers can pass the reason on.
    `fatal`: the policy is "error", but the row was met in a worker process; the main process raises it (a
    DataLoader would otherwise wrap the error in a worker traceback)."""

    error: DataError
    fatal: bool = False


class DataReport:
    """Counts rows seen, lists bad rows with their reasons, and counts rows whose answer was partly truncated."""

    def __init__(self, max_listed: int = 10_000):
        self.seen = 0
        self.bad: list[DataError] = []
        self.reasons: Counter[str] = Counter()
        self.truncated: list[str] = []
        self.max_listed = max_listed  # a badly broken file should not fill memory with its own report

    def add_bad(self, error: DataError) -> None:
        self.reasons[error.reason] += 1
        if len(self.bad) < self.max_listed:
            self.bad.append(error)

    def add_truncated(self, source: str) -> None:
        if len(self.truncated) < self.max_listed:
            self.truncated.append(source)

    def add_batch(self, batch) -> None:
        """Record what a collated batch carries (the way back from DataLoader worker processes); raise the bad
        row of a policy-"error" dataset met in a worker."""
        self.seen += len(batch.sources) + len(batch.skipped) + len(batch.fatal)
        for error in batch.skipped + batch.fatal:
            self.add_bad(error)
        for source in batch.truncated:
            self.add_truncated(source)
        if batch.fatal:
            raise batch.fatal[0]

    def extend(self, errors: Iterable[DataError]) -> None:
        for error in errors:
            self.add_bad(error)

    @property
    def num_bad(self) -> int:
        return sum(self.reasons.values())

    def sources(self, reason: str | None = None) -> list[str]:
        return [e.source for e in self.bad if reason is None or e.reason == reason]

    def __bool__(self) -> bool:  # true when something went wrong
        return self.num_bad > 0

    def summary(self, max_rows: int = 50) -> str:
        lines = [f"{self.seen} rows seen, {self.num_bad} bad, {len(self.truncated)} with a truncated answer"]
        for reason, count in self.reasons.most_common():
            lines.append(f"  {count:6d}  {reason}")
        for error in self.bad[:max_rows]:
            lines.append(f"  {error}")
        if self.num_bad > max_rows:
            lines.append(f"  ... and {self.num_bad - max_rows} more")
        return "\n".join(lines)
