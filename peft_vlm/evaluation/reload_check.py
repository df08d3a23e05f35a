"""The reload check (`eval.verify_reload`): the saved adapter on a freshly built base must answer as the trained
model did. Where some answers differ, the check finds out why, and either explains it in one line or fails the run.

Greedy answers are a chain of argmax decisions. In reduced precision (bf16 autocast) the logits of one question
depend a little on the batch it is answered in (its padding and the matmul shapes), and after a few training steps
many next tokens are near-tied, so the same weights can answer one question differently in two batchings. A real
save/load fault shows otherwise: a tensor of the reloaded model differs from the trained model's, or the two answer
differently when given exactly the same batch (something the adapter file does not carry, such as the attention
implementation or the image resize).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from peft_vlm.errors import PeftVlmError


class ReloadMismatch(PeftVlmError):
    """The saved adapter on a fresh base does not reproduce the trained model."""


@dataclass
class ReloadCheck:
    compared: int  # questions answered by both
    differing: list[int] = field(default_factory=list)  # their indices where the answers differ, all explained
    precision: str = "fp32"

    @property
    def identical(self) -> bool:
        return not self.differing

    def as_dict(self) -> dict:
        return {"compared": self.compared, "differing": len(self.differing), "precision": self.precision}

    def line(self, where: str) -> str:
        if self.identical:
            return f"saved adapter on a freshly loaded base: identical answers on {where}"
        return (f"saved adapter on a freshly loaded base: {len(self.differing):,} of {self.compared:,} answers "
                f"differ on {where}, by the {self.precision} rounding of the batches they were answered in (equal "
                f"tensors; asked again in one batch, both models give the same answers)")


def tensor_difference(trained, reloaded) -> str | None:
    """The name of the first parameter or buffer that the two models do not hold equal (or hold only one of)."""
    ours = dict(trained.named_parameters()) | dict(trained.named_buffers())
    theirs = dict(reloaded.named_parameters()) | dict(reloaded.named_buffers())
    for name in sorted(ours.keys() | theirs.keys()):
        if name not in ours or name not in theirs:
            return name
        a, b = ours[name].detach(), theirs[name].detach()
        if a.shape != b.shape or not torch.equal(a.cpu().float(), b.cpu().float()):
            return name
    return None


def check_reload(trained, reloaded, questions: Sequence, trained_answers, reloaded_answers, answer,
                 precision: str = "fp32") -> ReloadCheck:
    """Compare the answers of `trained` and `reloaded` on the first questions both answered (`Accuracy` objects);
    `answer(model, questions)` answers again as the evaluation did (protocol, `precision`, batch size). Returns the
    check, whose `line` the report prints; raises `ReloadMismatch` naming the first differing question where the
    difference is not the batching's rounding."""
    ours = [given for _, _, given in trained_answers.examples]
    theirs = [given for _, _, given in reloaded_answers.examples]
    compared = min(len(ours), len(theirs))
    differing = [i for i in range(compared) if ours[i] != theirs[i]]
    if not differing:
        return ReloadCheck(compared, [], precision)
    first = differing[0]

    def fault(cause: str) -> ReloadMismatch:
        return ReloadMismatch(
            f"the saved adapter on a freshly loaded base does not reproduce the trained model: {cause}; first "
            f"differing question #{first} {questions[first].question!r}: trained {ours[first].strip()!r}, reloaded "
            f"{theirs[first].strip()!r} ({len(differing)} of {compared} answers differ)")

    name = tensor_difference(trained, reloaded)
    if name is not None:
        raise fault(f"its tensor '{name}' differs from the trained model's")
    asked = [questions[i] for i in differing]
    again = zip(answer(trained, asked).examples, answer(reloaded, asked).examples)
    for index, ((_, _, a), (_, _, b)) in zip(differing, again):
        if a != b:
            first = index
            raise fault("with equal weights, the two answer differently in the same batch (something the adapter "
                        "file does not carry: attention implementation, image resize, answer protocol?)")
    return ReloadCheck(compared, differing, precision)

