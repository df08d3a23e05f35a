"""ScienceQA scoring: greedy answers of a model, accuracy overall, by subject and by context modality (text: a
non-empty hint; image; none), as in the paper's table; a question with both a hint and an image counts in both.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

from peft_vlm.data.scienceqa import Problem
from peft_vlm.evaluation.vqa import multiple_choice_letter
from peft_vlm.model.expert_context import with_expert_context


@dataclass
class ScienceQAAccuracy:
    correct: Counter = field(default_factory=Counter)
    total: Counter = field(default_factory=Counter)
    answers: dict[str, str] = field(default_factory=dict)  # problem id -> the model's text

    def add(self, problem: Problem, answered: str) -> None:
        hit = multiple_choice_letter(answered) == problem.letter
        for key in ("all", f"subject:{problem.subject}", *(f"context:{c}" for c in problem.contexts)):
            self.total[key] += 1
            self.correct[key] += hit
        self.answers[problem.id] = answered

    def __getitem__(self, key: str) -> float:
        return self.correct[key] / self.total[key] if self.total[key] else float("nan")

    def by(self, kind: str) -> dict[str, float]:
        """{"natural science": 0.8, ...} for kind "subject"; {"text": ..., "image": ..., "none": ...} for "context"."""
        prefix = f"{kind}:"
        return {key[len(prefix):]: self[key] for key in sorted(self.total) if key.startswith(prefix)}

    def __str__(self) -> str:
        parts = [f"all {100 * self['all']:.1f}% ({self.total['all']})"]
        parts += [f"{name} {100 * value:.1f}%" for kind in ("subject", "context")
                  for name, value in self.by(kind).items()]
        return "  ".join(parts)


def score(problems: Sequence[Problem], answers: Sequence[str]) -> ScienceQAAccuracy:
    accuracy = ScienceQAAccuracy()
    for problem, answered in zip(problems, answers, strict=True):
        accuracy.add(problem, answered)
    return accuracy


def evaluate(model, problems: Sequence[Problem], batch_size: int = 8, max_new_tokens: int = 12,
             expert: Callable | None = None) -> ScienceQAAccuracy:
    """Greedy answers of a VisionLanguageModel, scored. `expert` (see `peft_vlm.model.expert_context`) adds an external
    model's text about each image (a caption, OCR) to the prompt as context."""
    from PIL import Image

    answers = []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        images = [Image.open(p.image).convert("RGB") if p.image else None for p in chunk]
        prompts = [p.prompt() for p in chunk]
        if expert is not None:
            prompts = with_expert_context(prompts, images, expert)
        answers += model.generate(images=images, prompts=prompts, max_new_tokens=max_new_tokens)
    return score(problems, answers)
