"""`TrainConfig`: every knob of a training run, as plain data (recipes set it from YAML)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from peft_vlm.errors import ConfigError


@dataclass
class TrainConfig:
    output_dir: str = "out/run"
    max_steps: int = 1000
    batch_size: int = 8  # examples per process per micro-batch
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    group_learning_rates: dict[str, float] = field(default_factory=dict)  # e.g. {"vision": 1e-3, "language": 5e-4}
    weight_decay: float = 0.02
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 0
    lr_schedule: str = "cosine"  # "cosine" (to min_lr_ratio x lr) or "constant", both after linear warm-up
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    # Joint training (LLaMA-Adapter V2 sec 4.2): which parameter groups each kind of batch updates.
    caption_ratio: float = 0.5  # share of optimizer steps that are caption steps
    caption_groups: tuple[str, ...] = ("vision",)
    instruction_groups: tuple[str, ...] = ("language",)
    mixed_precision: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU), "bf16", "no"
    gradient_checkpointing: bool = False
    sharding: str = "ddp"  # "ddp" or "fsdp2" (parameters sharded over processes)
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100  # 0: only at the end
    keep_checkpoints: int = 2
    max_nonfinite_steps: int = 5  # consecutive skipped steps before the run stops (with a checkpoint)
    report_to: str | None = "tensorboard"
    resume: bool = True  # continue from the newest checkpoint in output_dir, if there is one
    progress_bar: bool = True

    def __post_init__(self) -> None:
        checks = {
            "max_steps": self.max_steps >= 1,
            "batch_size": self.batch_size >= 1,
            "gradient_accumulation_steps": self.gradient_accumulation_steps >= 1,
            "learning_rate": self.learning_rate > 0,
            "caption_ratio": 0.0 <= self.caption_ratio <= 1.0,
            "lr_schedule": self.lr_schedule in ("cosine", "constant"),
            "mixed_precision": self.mixed_precision in ("auto", "bf16", "no"),
            "sharding": self.sharding in ("ddp", "fsdp2"),
        }
        for name, valid in checks.items():
            if not valid:
                raise ConfigError(f"TrainConfig.{name}={getattr(self, name)!r} is not valid")
        overlap = set(self.caption_groups) & set(self.instruction_groups)
        if overlap:
            raise ConfigError(f"caption_groups and instruction_groups must be disjoint; both have {sorted(overlap)}")
        self.betas = tuple(self.betas)
        self.caption_groups = tuple(self.caption_groups)
        self.instruction_groups = tuple(self.instruction_groups)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown training option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values)
