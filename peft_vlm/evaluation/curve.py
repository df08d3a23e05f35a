"""Accuracy against training steps: a small evaluation every `every` steps, with the real image and with a neutral
grey one, per question type; drawn as a PNG at the end of training (`accuracy_curve.png` beside `loss_curve.png`).

Use it as a `JointTrainer` callback: `JointTrainer(..., callbacks=[AccuracyCurve(questions, every=50)])`. As a
callback it also sends its points to the run's tracker (TensorBoard by default) at their step: `eval/accuracy_<type>`
with the real image, `eval/accuracy_<type>_grey` with the grey one (`yes/no` as `yes_no`); a point measured before
training (`measure(model, 0)`) goes with the first step.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from peft_vlm.data.answer_protocol import AnswerProtocol
from peft_vlm.runtime.run_output import tag
from peft_vlm.evaluation.vqa import Question, grey_image, vqa_accuracy


def evenly_by_type(questions: Sequence[Question], per_type: int) -> list[Question]:
    """`per_type` evenly spaced questions of each type (all of a type that has fewer)."""
    by_type = defaultdict(list)
    for question in questions:
        by_type[question.kind].append(question)
    chosen = []
    for kind in sorted(by_type, key=str):
        items = by_type[kind]
        count = min(per_type, len(items))
        chosen += [items[i * len(items) // count] for i in range(count)]
    return chosen


class AccuracyCurve:
    """`vqa_accuracy` on `questions` (real and grey image) every `every` steps and after the last one; `measure`
    adds a point by hand (e.g. step 0, before training)."""

    def __init__(self, questions: Sequence[Question], every: int, output_dir: str | Path, batch_size: int = 32,
                 protocol: AnswerProtocol | None = None):
        self.questions, self.every, self.batch_size = list(questions), every, batch_size
        self.protocol = protocol  # how to answer; None: the model's own `answer_protocol`
        self.output_dir = Path(output_dir)
        self.points: list[dict] = []  # {"step", "image": "real"/"grey", kind: accuracy, ...}
        self.logged = 0  # points already sent to a tracker

    def __call__(self, trainer, step: int) -> None:
        if not (step % self.every and step != trainer.config.max_steps):
            self.measure(trainer.unwrapped, step)
        self.send(trainer)

    def send(self, trainer) -> None:
        """The points not sent yet, to the trainer's tracker, each at its step."""
        for point in self.points[self.logged:]:
            suffix = "" if point["image"] == "real" else f"_{tag(point['image'])}"
            trainer.log({f"eval/accuracy_{tag(kind)}{suffix}": value for kind, value in point.items()
                         if kind not in ("step", "image")}, point["step"])
        self.logged = len(self.points)

    def measure(self, model, step: int) -> None:
        for image, replace in (("real", None), ("grey", grey_image(model))):
            accuracy = vqa_accuracy(model, self.questions, batch_size=self.batch_size, replace_image=replace,
                                    protocol=self.protocol)
            self.points.append({"step": step, "image": image, **accuracy.as_dict()})
        self.write()

    def write(self) -> Path:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "accuracy_curve.json").write_text(json.dumps(self.points, indent=1))
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        # per question type only: "all" of a type-balanced sample is no figure of the test split
        kinds = sorted({key for point in self.points for key in point} - {"step", "image", "all"})
        figure, axes = plt.subplots(1, len(kinds), figsize=(3.2 * len(kinds), 3), sharey=True, squeeze=False)
        for axis, kind in zip(axes[0], kinds):
            for image, style in (("real", "-o"), ("grey", "--x")):
                points = [p for p in self.points if p["image"] == image and kind in p]
                axis.plot([p["step"] for p in points], [100 * p[kind] for p in points], style, label=f"{image} image")
            axis.set_title(kind)
            axis.set_xlabel("step")
            axis.set_ylim(0, 100)
            axis.grid(alpha=0.3)
        axes[0][0].set_ylabel("accuracy (%)")
        axes[0][0].legend(loc="lower right", fontsize=8)
        figure.tight_layout()
        path = self.output_dir / "accuracy_curve.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        return path
