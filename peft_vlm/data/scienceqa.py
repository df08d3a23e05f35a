"""ScienceQA (Lu et al., arXiv 2209.09513): multiple-choice science questions with an optional image, a text context
(the "hint"), a lecture and a solution; read from the dataset's own `problems.json`; scored by
`peft_vlm.evaluation.scienceqa`.

    problems.json: {"<id>": {"question", "choices": [...], "answer": <index>, "hint", "image": "image.png" or null,
                             "lecture", "solution", "subject", "grade", "split", ...}, ...}
    images:        <image_root>/<split>/<id>/image.png  (image_root defaults to an `images` folder next to the
                   JSON file, where the dataset's download puts them, else the JSON file's folder)

Prompts follow the format used by LLaVA and LLaMA-Adapter on ScienceQA: "Context: ...\\nQuestion: ...\\nOptions:
(A) ... (B) ..." with the image in front; answers are "The answer is (B)." and, with `reasoning`, the lecture and
solution after the answer ("after", the paper's QCM->ALE) or before it ("before", chain of thought). Accuracy is
reported overall, by subject (natural science, social science, language science) and by context modality (text:
a non-empty hint; image; none), as in the paper's table; a question with both a hint and an image counts in both.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from peft_vlm.data.formats import SampleList
from peft_vlm.errors import ConfigError
from peft_vlm.data.prompting import IMAGE_PLACEHOLDER

LETTERS = "ABCDEFGH"
REASONING = (None, "after", "before")
CONTEXTS = ("text", "image", "none")


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    choices: tuple[str, ...]
    answer: int
    hint: str = ""
    image: str | None = None  # path of the image file
    lecture: str = ""
    solution: str = ""
    subject: str = ""

    @property
    def letter(self) -> str:
        return LETTERS[self.answer]

    @property
    def contexts(self) -> tuple[str, ...]:
        """The paper's context modalities: TXT (a hint), IMG (an image), NO (neither)."""
        found = tuple(name for name, present in (("text", self.hint.strip()), ("image", self.image)) if present)
        return found or ("none",)

    def prompt(self) -> str:
        options = " ".join(f"({LETTERS[i]}) {choice}" for i, choice in enumerate(self.choices))
        context = self.hint.strip() or "N/A"
        text = f"Context: {context}\nQuestion: {self.question}\nOptions: {options}"
        return f"{IMAGE_PLACEHOLDER}\n{text}" if self.image else text

    def target(self, reasoning: str | None = None) -> str:
        answer = f"The answer is ({self.letter})."
        explanation = " ".join(part.strip() for part in (self.lecture, self.solution) if part.strip())
        if reasoning == "after" and explanation:
            return f"{answer} BECAUSE: {explanation}"
        if reasoning == "before" and explanation:
            return f"{explanation}\n{answer}"
        return answer


def read_problems(path: str | Path, split: str | None = "test", image_root: str | Path | None = None) -> list[Problem]:
    """The problems of one split (all with `split=None`) in file order; a malformed entry is a ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no ScienceQA problems file at '{path}'")
    try:
        table = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"'{path}' is not valid JSON: {error}") from None
    if not isinstance(table, dict):
        raise ConfigError(f"'{path}': ScienceQA's problems.json maps problem ids to problems")
    root = Path(image_root) if image_root else (
        path.parent / "images" if (path.parent / "images").is_dir() else path.parent)
    problems = []
    for problem_id, entry in table.items():
        if split is not None and entry.get("split") != split:
            continue
        try:
            choices = tuple(str(c) for c in entry["choices"])
            if not 2 <= len(choices) <= len(LETTERS) or not 0 <= int(entry["answer"]) < len(choices):
                raise ValueError(f"answer {entry['answer']!r} for {len(choices)} choices")
            image = entry.get("image")
            problems.append(Problem(
                str(problem_id), str(entry["question"]), choices, int(entry["answer"]), entry.get("hint") or "",
                str(root / entry.get("split", split or "") / str(problem_id) / image) if image else None,
                entry.get("lecture") or "", entry.get("solution") or "", entry.get("subject") or "",
            ))
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigError(f"'{path}', problem {problem_id}: not in ScienceQA's layout ({error})") from None
    return problems


def training_samples(problems: Sequence[Problem], reasoning: str | None = None) -> SampleList:
    """Single-turn samples for `SampleEncoder` / `SampleDataset`: the prompt, then the answer (with reasoning)."""
    if reasoning not in REASONING:
        raise ConfigError(f"reasoning={reasoning!r}; use one of {', '.join(map(str, REASONING))}")
    return SampleList([
        {"messages": [{"role": "user", "content": p.prompt()}, {"role": "assistant", "content": p.target(reasoning)}],
         "images": [p.image] if p.image else [], "source": f"scienceqa:{p.id}"}
        for p in problems
    ])
