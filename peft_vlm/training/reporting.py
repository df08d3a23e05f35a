"""What a run shows while it trains: a progress bar (loss, kind of batch, tokens/s), TensorBoard scalars (through
accelerate's trackers) every `log_every` steps, and `loss_curve.png` at the end."""
from __future__ import annotations

from pathlib import Path

from peft_vlm.training.config import TrainConfig


class Reporter:
    def __init__(self, config: TrainConfig, accelerator, stream_names: list[str]):
        self.config, self.accelerator, self.stream_names = config, accelerator, stream_names
        self.progress = None

    def start(self, step: int) -> None:
        config = self.config
        if config.report_to:
            self.accelerator.init_trackers("peft_vlm", config={k: str(v) for k, v in vars(config).items()})
        from tqdm.auto import tqdm

        enabled = config.progress_bar and self.accelerator.is_main_process
        self.progress = tqdm(total=config.max_steps, initial=step, disable=not enabled, desc="training",
                             dynamic_ncols=True)

    def step(self, step: int, stream: str, metrics: dict, seconds: float) -> None:
        """`step` optimizer steps are done; the last one took `seconds`."""
        tokens_per_second = metrics["tokens"] / max(seconds, 1e-9)
        self.progress.update(1)
        self.progress.set_postfix(loss=f"{metrics['loss']:.3f}", kind=stream, tok_s=f"{tokens_per_second:.0f}")
        if self.config.report_to and (step % self.config.log_every == 0 or step == self.config.max_steps):
            self.accelerator.log({f"loss/{stream}": metrics["loss"], "lr": metrics["lr"],
                                  "tokens_per_s": tokens_per_second},
                                 step=step)

    def close(self) -> None:
        self.progress.close()

    def finish(self, history: list[dict]) -> None:
        if self.accelerator.is_main_process:
            write_loss_curve(history, self.stream_names, Path(self.config.output_dir) / "loss_curve.png")
        self.accelerator.end_training()


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
