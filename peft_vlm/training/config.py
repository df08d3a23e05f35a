"""`TrainConfig`: every knob of a training run, as plain data (recipes set it from YAML)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from peft_vlm.errors import ConfigError
from peft_vlm.options import check_options


BF16_CHOICES = ("bf16", "bf16-native")


def native_bf16() -> bool:
    """Whether this process's device computes bf16 matmuls natively: a CUDA GPU with bf16, else the CPU's oneDNN."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_mixed_precision(mixed_precision: str | None) -> str:
    """The precision a run gets, as accelerate names it: "bf16" or "no"."""
    import torch

    if mixed_precision == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    if mixed_precision == "bf16-native":
        return "bf16" if native_bf16() else "no"
    return mixed_precision or "no"


@dataclass
class TrainConfig:
    output_dir: str | os.PathLike = "out/run"
    max_steps: int = 1000
    batch_size: int = 8  # examples per process per micro-batch
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    group_learning_rates: dict[str, float] = field(default_factory=dict)  # e.g. {"vision": 1e-3, "language": 5e-4}
    # rates by parameter name (fnmatch patterns, the first match wins, over group_learning_rates), e.g.
    # {"*early_fusion.gate": 9e-3}: a zero-initialised gate at the paper's rate while the matrices keep a small
    # model's rate
    parameter_learning_rates: dict[str, float] = field(default_factory=dict)
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
    # "auto" (bf16 on GPU, fp32 on CPU), "bf16", "no", or "bf16-native": bf16 where the device computes it natively
    # (a GPU with bf16; a CPU whose oneDNN has bf16 kernels, i.e. AVX-512 or AMX), fp32 elsewhere. On an AVX2-only CPU
    # bf16 matmuls are emulated, ~50x slower than fp32 (benchmarks/bench_cpu_mfu.py measures both ceilings).
    mixed_precision: str = "auto"
    # with mixed_precision bf16 (or bf16-native where it gives bf16): hold the frozen fp32 linear weights in bf16 while
    # training, so that autocast does not cast them again in every forward (the same matmul operands, so the same
    # losses; training/frozen_weights.py)
    frozen_linears_in_bf16: bool = False
    # torch.compile each decoder layer's forward for the run (training/compiled_layers.py): fuses a CPU step's
    # norms and elementwise work; minutes of compiling at the first steps, so for runs of many steps
    compile_layers: bool = False
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
    # several examples share a row of a batch (whole examples, image tokens never cut; rows as wide as the batch's
    # longest example), each with its own positions and a mask that keeps it to itself: fewer pad tokens computed
    packing: bool = False
    # the frozen vision tower's patch tokens computed once per image and reused (model/vision_feature_cache.py):
    # None: when the tower is frozen and deterministic and the data repeats (a stream runs past one epoch); True:
    # always (an error if the tower trains or draws random numbers); False: never
    cache_vision_features: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.output_dir, (str, os.PathLike)):
            self.output_dir = os.path.expanduser(self.output_dir)
        check_options(type(self), {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, "TrainConfig")
        for name, (valid, accepted) in _ranges(self).items():
            if not valid:
                raise ConfigError(f"TrainConfig: {name}={getattr(self, name)!r} is not valid; "
                                  f"{name} must be {accepted}")
        if self.frozen_linears_in_bf16 and (self.mixed_precision not in BF16_CHOICES or self.sharding != "ddp"):
            raise ConfigError("TrainConfig: frozen_linears_in_bf16=True needs mixed_precision='bf16' or "
                              f"'bf16-native' and sharding='ddp' (got {self.mixed_precision!r}, {self.sharding!r})")
        if self.compile_layers and self.sharding != "ddp":
            raise ConfigError(f"TrainConfig: compile_layers=True is for single-process and DDP runs "
                              f"(got sharding={self.sharding!r})")
        overlap = set(self.caption_groups) & set(self.instruction_groups)
        if overlap:
            raise ConfigError(f"caption_groups and instruction_groups must be disjoint; both have {sorted(overlap)}")
        self.betas = tuple(self.betas)
        self.caption_groups = tuple(self.caption_groups)
        self.instruction_groups = tuple(self.instruction_groups)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        if not isinstance(values, dict):
            raise ConfigError(f"train section: expected a mapping of training options, got {values!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known, key=str)
        if unknown:
            raise ConfigError(f"unknown training option(s) {', '.join(map(str, unknown))}; "
                              f"known: {', '.join(sorted(known))}")
        return cls(**values)


def _ranges(config: TrainConfig) -> dict[str, tuple[bool, str]]:
    """{option: (whether its value is in range, what is accepted)}; types are checked before."""
    return {
        "max_steps": (config.max_steps >= 1, "an integer >= 1"),
        "batch_size": (config.batch_size >= 1, "an integer >= 1"),
        "gradient_accumulation_steps": (config.gradient_accumulation_steps >= 1, "an integer >= 1"),
        "learning_rate": (config.learning_rate > 0, "a number > 0"),
        "group_learning_rates": (all(v > 0 for v in config.group_learning_rates.values()),
                                 "a mapping of group: rate > 0"),
        "parameter_learning_rates": (all(v > 0 for v in config.parameter_learning_rates.values()),
                                     "a mapping of parameter-name pattern: rate > 0"),
        "weight_decay": (config.weight_decay >= 0, "a number >= 0"),
        "betas": (all(0 <= b < 1 for b in config.betas), "two numbers in [0, 1)"),
        "warmup_steps": (config.warmup_steps >= 0, "an integer >= 0"),
        "lr_schedule": (config.lr_schedule in ("cosine", "constant"), "'cosine' or 'constant'"),
        "min_lr_ratio": (0 <= config.min_lr_ratio <= 1, "a number in [0, 1]"),
        "max_grad_norm": (config.max_grad_norm is None or config.max_grad_norm > 0,
                          "a number > 0, or null for no clipping"),
        "caption_ratio": (0 <= config.caption_ratio <= 1, "a number in [0, 1]"),
        "mixed_precision": (config.mixed_precision in ("auto", "bf16", "bf16-native", "no"),
                            "'auto', 'bf16', 'bf16-native' or 'no'"),
        "sharding": (config.sharding in ("ddp", "fsdp2"), "'ddp' or 'fsdp2'"),
        "seed": (0 <= config.seed < 2**32, "an integer in [0, 2**32)"),
        "log_every": (config.log_every >= 1, "an integer >= 1"),
        "checkpoint_every": (config.checkpoint_every >= 0, "an integer >= 0 (0: only at the end)"),
        "keep_checkpoints": (config.keep_checkpoints >= 1, "an integer >= 1 (the newest checkpoints kept)"),
        "max_nonfinite_steps": (config.max_nonfinite_steps >= 1, "an integer >= 1"),
        "output_dir": (bool(config.output_dir), "a folder path"),
    }
