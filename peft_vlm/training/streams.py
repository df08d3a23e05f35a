"""Data streams: which kind of batch a step takes, from which dataset, and which parameter groups it trains.

Joint training (LLaMA-Adapter V2 sec 4.2) has two streams: `caption` batches train the `caption_groups` (the
`vision` group: connector, early fusion, ...), `instruction` batches the `instruction_groups` (`language`: prompts,
gates, bias/scale, LoRA, ...). With `data=` a single stream `train` trains every group. Data order is a seeded
permutation per stream and epoch; a stream's cursor (epoch, position) is all a checkpoint needs to continue it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fnmatch import fnmatch
from typing import Any, Callable

from torch import nn

from peft_vlm.data.dataset import shuffled_order
from peft_vlm.errors import ConfigError, PeftVlmError
from peft_vlm.training.config import TrainConfig


@dataclass
class DataStream:
    """One kind of batch: its dataset, the parameter groups it trains, and where it is in its seeded order."""

    name: str
    dataset: Any  # len() and [index] -> example (see peft_vlm.data.SampleDataset)
    groups: tuple[str, ...]
    seed: int
    epoch: int = 0
    position: int = 0
    _order: list[int] = field(default_factory=list, repr=False)

    def take(self, count: int) -> list[int]:
        """The next `count` dataset indices, starting a new shuffled epoch when one runs out."""
        indices = []
        while len(indices) < count:
            if not self._order:
                self._order = shuffled_order(len(self.dataset), self.seed, self.epoch)
            take = min(count - len(indices), len(self._order) - self.position)
            indices += self._order[self.position : self.position + take]
            self.position += take
            if self.position == len(self._order):
                self.epoch, self.position, self._order = self.epoch + 1, 0, []
        return indices

    def cursor(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, cursor: dict[str, int]) -> None:
        self.epoch, self.position, self._order = cursor["epoch"], cursor["position"], []


def make_streams(config: TrainConfig, group_of: dict[str, str], caption_data, instruction_data, data):
    """(streams by name, trained parameter names by stream) for the datasets given; refuses a stream whose groups
    hold none of the model's trainable parameters, and a `parameter_learning_rates` pattern that matches none."""
    unmatched = [p for p in config.parameter_learning_rates if not any(fnmatch(n, p) for n in group_of)]
    if unmatched:
        raise ConfigError(f"TrainConfig: parameter_learning_rates pattern(s) {unmatched} match no trainable "
                          f"parameter (e.g. {next(iter(group_of))!r})")
    if data is not None and (caption_data is not None or instruction_data is not None):
        raise ConfigError("pass either data= (one group) or caption_data=/instruction_data= (joint), not both")
    all_groups = tuple(sorted(set(group_of.values())))
    if data is not None:
        specs = [("train", data, all_groups)]
    else:
        specs = [("caption", caption_data, config.caption_groups),
                 ("instruction", instruction_data, config.instruction_groups)]
    streams = {
        name: DataStream(name, dataset, groups, seed=config.seed * 1000 + index)
        for index, (name, dataset, groups) in enumerate(specs)
        if dataset is not None
    }
    if not streams:
        raise ConfigError("no training data: pass data=, caption_data= or instruction_data=")
    names_by_stream = {name: [n for n, group in group_of.items() if group in stream.groups]
                       for name, stream in streams.items()}
    for name, names in names_by_stream.items():
        if not names:
            raise ConfigError(
                f"{name} batches train groups {list(streams[name].groups)}, but the model's trainable "
                f"parameters are in groups {list(all_groups)}"
            )
    return streams, names_by_stream


def untrained_groups(group_of: dict[str, str], streams: dict[str, DataStream]) -> dict[str, list[str]]:
    """{group: its parameter names} of the trainable groups that no stream of this run trains (a connector listed
    trainable, say, when the run has instruction data only): they are saved as they were initialised."""
    fed = {group for stream in streams.values() for group in stream.groups}
    untrained: dict[str, list[str]] = {}
    for name, group in group_of.items():
        if group not in fed:
            untrained.setdefault(group, []).append(name)
    return untrained


def stream_for(streams: dict[str, DataStream], caption_ratio: float, step: int) -> DataStream:
    """Caption steps are spread evenly: step i is one when floor((i+1) r) > floor(i r)."""
    if len(streams) == 1:
        return next(iter(streams.values()))
    is_caption = math.floor((step + 1) * caption_ratio) > math.floor(step * caption_ratio)
    return streams["caption" if is_caption else "instruction"]


def param_groups(config: TrainConfig, parameters: dict[str, nn.Parameter], group_of: dict[str, str], stream: str,
                 names: list[str]) -> list[dict]:
    """AdamW parameter groups of one stream, one per (method group, decay, rate): matrices decay, vectors (biases,
    scales, norms, gates) do not, since decaying a scale or gate would pull the model away from its base. A name
    that matches a pattern of `parameter_learning_rates` takes that rate, others their group's."""
    groups: dict[tuple[str, bool, float], list[str]] = {}
    for name in names:
        group = group_of[name]
        rate = next((rate for pattern, rate in config.parameter_learning_rates.items() if fnmatch(name, pattern)),
                    config.group_learning_rates.get(group, config.learning_rate))
        groups.setdefault((group, parameters[name].dim() >= 2, rate), []).append(name)
    param_groups = [
        {
            "params": [parameters[n] for n in group_names],
            "names": group_names,
            "weight_decay": config.weight_decay if decay else 0.0,
            "lr": rate,
            "initial_lr": rate,
            "group": group,
            "stream": stream,
        }
        for (group, decay, rate), group_names in sorted(groups.items())
    ]
    return param_groups


def micro_batches(stream: DataStream, collate: Callable, config: TrainConfig, world: int, rank: int):
    """This process's micro-batches of the stream's next global batch (the same split for any number of
    processes), and the dataset indices of every slot of the global batch."""
    size, accumulation = config.batch_size, config.gradient_accumulation_steps
    indices = stream.take(size * world * accumulation)
    slots = [indices[slot * size : (slot + 1) * size] for slot in range(world * accumulation)]
    batches = []
    for micro in range(accumulation):
        batch = collate([stream.dataset[i] for i in slots[micro * world + rank]])
        report = getattr(stream.dataset, "report", None)
        if report is not None:
            report.add_batch(batch)
        batches.append(batch)
    return batches, slots


def stand_in_batch(stream: DataStream, collate: Callable, slots: list[list[int]], step: int):
    """A batch with at least one good row from another slot of the same step, for a process whose own micro-batch
    lost every row (see `Backend.empty_loss`)."""
    for rows in slots:
        batch = collate([stream.dataset[i] for i in rows])
        if len(batch):
            return batch
    raise PeftVlmError(
        f"every row of the {stream.name} batch of step {step} was skipped as bad (data.bad_samples: skip); "
        "under DeepSpeed a step needs at least one good row: check the data, or train without DeepSpeed"
    )
