"""`trainable_summary`: what each method trains, in which parameter group, as a share of the base model."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from peft_vlm.runtime.tracking import state_of


def _logical_numel(parameter: nn.Parameter) -> int:
    # bitsandbytes packs two 4-bit weights per stored byte.
    return parameter.numel() * 2 if type(parameter).__name__ == "Params4bit" else parameter.numel()


@dataclass(frozen=True)
class SummaryRow:
    method: str
    group: str
    parameters: int
    percent_of_base: float


@dataclass(frozen=True)
class TrainableSummary:
    rows: tuple[SummaryRow, ...]
    base_parameters: int

    @property
    def trainable_parameters(self) -> int:
        return sum(row.parameters for row in self.rows)

    def by_group(self) -> dict[str, int]:
        groups: dict[str, int] = {}
        for row in self.rows:
            groups[row.group] = groups.get(row.group, 0) + row.parameters
        return groups

    def __str__(self) -> str:
        header = f"{'method':<24} {'group':<10} {'parameters':>14} {'% of base':>10}"
        lines = [header, "-" * len(header)]
        lines += [f"{r.method:<24} {r.group:<10} {r.parameters:>14,} {r.percent_of_base:>9.4f}%" for r in self.rows]
        lines.append("-" * len(header))
        total = self.trainable_parameters
        lines.append(f"{'trainable':<24} {'':<10} {total:>14,} {100 * total / max(self.base_parameters, 1):>9.4f}%")
        lines.append(f"{'base (frozen)':<24} {'':<10} {self.base_parameters:>14,}")
        return "\n".join(lines)


def trainable_summary(model: nn.Module) -> TrainableSummary:
    state = state_of(model, create=False)
    applied = state.applied if state is not None else []
    tracked = state.tracked() if state is not None else {}
    base = sum(_logical_numel(p) for p in model.parameters() if id(p) not in tracked)
    rows = []
    for entry in applied:
        for group, parameters in entry.parameters.items():
            count = sum(p.numel() for p in parameters)
            rows.append(SummaryRow(entry.name, group, count, 100 * count / max(base, 1)))
    return TrainableSummary(tuple(rows), base)
