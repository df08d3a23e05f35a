"""What a run shows while it trains: a progress bar (loss, kind of batch, tokens/s), tracker scalars (TensorBoard by
default, through accelerate's trackers) every `log_every` steps, and `loss_curve.png` at the end.

The tracker gets, at each logged step, the mean loss since the last logged step of every stream that had steps in
that window (`train/loss_caption`, `train/loss_instruction`, or `train/loss_train` with `data=`) and of all of them
(`train/loss`): steps alternate between the streams, so a single step's loss would show one stream only. Beside them:
each parameter group's learning rate (`train/lr_<group>`), `train/tokens_per_s` and `train/skipped_steps`. Other
parts of a run add theirs through `Reporter.log` (`JointTrainer.log`): the accuracy curve's `eval/accuracy_<type>`.
"""
from __future__ import annotations

import math
from pathlib import Path

from peft_vlm.runtime.run_output import tag
from peft_vlm.training.config import TrainConfig


class Reporter:
    def __init__(self, config: TrainConfig, accelerator, stream_names: list[str]):
        self.config, self.accelerator, self.stream_names = config, accelerator, stream_names
        self.progress = None
        self.tracking = False
        self._window: dict[str, list[float]] = {}  # stream -> finite losses since the last logged step
        self._skipped = 0

    def start(self, step: int) -> None:
        config = self.config
        if config.report_to:
            self.accelerator.init_trackers("peft_vlm", config={k: str(v) for k, v in vars(config).items()})
            self.tracking = True
        from tqdm.auto import tqdm

        enabled = config.progress_bar and self.accelerator.is_main_process
        self.progress = tqdm(total=config.max_steps, initial=step, disable=not enabled, desc="training",
                             dynamic_ncols=True)

    def step(self, step: int, stream: str, metrics: dict, seconds: float) -> None:
        """`step` optimizer steps are done; the last one took `seconds`."""
        tokens_per_second = metrics["tokens"] / max(seconds, 1e-9)
        self.progress.update(1)
        self.progress.set_postfix(loss=f"{metrics['loss']:.3f}", kind=stream, tok_s=f"{tokens_per_second:.0f}")
        if math.isfinite(metrics["loss"]):
            self._window.setdefault(stream, []).append(metrics["loss"])
        self._skipped += bool(metrics.get("skipped"))
        if step % self.config.log_every == 0 or step == self.config.max_steps:
            values = {f"train/loss_{tag(name)}": sum(losses) / len(losses) for name, losses in self._window.items()}
            every = [loss for losses in self._window.values() for loss in losses]
            if every:
                values["train/loss"] = sum(every) / len(every)
            values.update({f"train/lr_{tag(group)}": lr for group, lr in metrics.get("group_lrs", {}).items()})
            values.update({"train/tokens_per_s": tokens_per_second, "train/skipped_steps": self._skipped})
            self.log(values, step)
            self._window, self._skipped = {}, 0

    def log(self, values: dict[str, float], step: int) -> None:
        """Scalars to the run's trackers (none without `report_to`), at `step`."""
        if self.tracking:
            self.accelerator.log(values, step=step)

    def close(self) -> None:
        self.progress.close()

    def finish(self, history: list[dict]) -> None:
        if self.accelerator.is_main_process:
            write_loss_curve(history, self.stream_names, Path(self.config.output_dir) / "loss_curve.png")
        # Every process past its last collective (the adapter's gather, rank 0's writes) before the process group
        # goes: a gloo group torn down under a peer's pending work aborts that peer at exit ("terminate called
        # without an active exception").
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        self.tracking = False


def write_loss_curve(history: list[dict], stream_names: list[str], path: Path) -> None:
    """One line per stream: the loss of its steps that were not skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for name in stream_names:
        points = [(h["step"], h["loss"]) for h in history if h["stream"] == name and not h["skipped"]]
        if points:
            axis.plot(*zip(*points), label=f"{name} batches", linewidth=1)
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
