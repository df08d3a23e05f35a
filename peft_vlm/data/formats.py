"""Readers for the data formats users already have, each turning a row into a sample:

    {"messages": [{"role": "user" | "assistant" | "system", "content": str}, ...],
     "images": [path or PIL image, ...], "source": "file.json:row 17"}

- LLaVA conversations (JSON array or JSONL): `{"image": "a.jpg", "conversations": [{"from": "human", "value":
  "<image>\\nWhat is this?"}, {"from": "gpt", "value": "A cat."}]}`; `image` may be a list or absent.
  An optional `"type"` (a string) is the question type evaluation reports accuracy by.
- Captions (JSONL or JSON array of `{"image", "caption"}`), or a COCO captions file (`images` + `annotations`).
  A caption becomes the answer to `caption_prompt`.
- Alpaca-style text instructions: `{"instruction", "input" (optional), "output"}`.

Rows are read lazily through `RecordFile`, except COCO files, whose two cross-referenced tables are loaded whole
(they are tens of MB). Image paths are relative to `image_root`, by default the data file's folder.
"""
from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

from peft_vlm.data.records import RecordFile, not_utf8, row_source
from peft_vlm.data.report import INVALID_JSON, NO_ANSWER, WRONG_SCHEMA
from peft_vlm.errors import ConfigError, DataError
from peft_vlm.data.prompting import IMAGE_PLACEHOLDER

CAPTION_PROMPT = "Describe the image briefly."
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
FORMATS = ("llava", "caption", "coco", "alpaca")


class Records:
    """A lazy sequence of samples: `len`, `records[i]` (a sample, or raises DataError), and `stream()`, which yields
    `(index, sample or DataError)` in file order without building the random-access index."""

    def __init__(self, file: RecordFile, convert: Callable[[Any, str], dict]):
        self.file, self.convert = file, convert

    def __len__(self) -> int:
        return len(self.file)

    def __getitem__(self, index: int) -> dict:
        result = self._sample(self.file.record(index), self.file.source(index))
        if isinstance(result, DataError):
            raise result
        return result

    def stream(self) -> Iterator[tuple[int, dict | DataError]]:
        for index, (row, record) in enumerate(self.file.stream()):
            yield index, self._sample(record, row_source(self.file.path, row))

    def _sample(self, record: Any, source: str) -> dict | DataError:
        if isinstance(record, DataError):
            return record
        try:
            return self.convert(record, source)
        except DataError as error:
            return error


class SampleList:
    """Samples already in memory (generated data, tests) behind the same interface as `Records`."""

    def __init__(self, samples: list[dict]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return self.samples[index]

    def stream(self) -> Iterator[tuple[int, dict | DataError]]:
        for index in range(len(self.samples)):
            try:
                yield index, self.samples[index]
            except DataError as error:
                yield index, error


# -- row converters -----------------------------------------------------------------------------------------------
def _field(record: Any, key: str, source: str, kind: type | tuple = str, required: bool = True) -> Any:
    if not isinstance(record, dict):
        raise DataError(source, WRONG_SCHEMA, f"expected a JSON object, got {type(record).__name__}")
    value = record.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, kind):
        found = "missing" if key not in record else f"a {type(value).__name__}"
        raise DataError(source, WRONG_SCHEMA, f"field '{key}' is {found}")
    return value


def _image_list(value: Any, root: Path, source: str) -> list[str]:
    names = [] if value is None else [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(source, WRONG_SCHEMA, "field 'image' must be a path or a list of paths")
    return [str(root / name) for name in names]


def _answer(text: str, source: str) -> str:
    if not text.strip():
        raise DataError(source, NO_ANSWER, "the answer is empty")
    return text


def llava_sample(record: Any, source: str, image_root: Path) -> dict:
    turns = _field(record, "conversations", source, list)
    images = _image_list(record.get("image"), image_root, source)
    messages = []
    for number, turn in enumerate(turns, start=1):
        speaker, value = (turn.get("from"), turn.get("value")) if isinstance(turn, dict) else (None, None)
        if speaker not in LLAVA_ROLES or not isinstance(value, str):
            raise DataError(source, WRONG_SCHEMA, f"turn {number} needs 'from' (human/gpt) and a string 'value'")
        messages.append({"role": LLAVA_ROLES[speaker], "content": value})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise DataError(source, NO_ANSWER, "no non-empty 'gpt' turn")
    sample = {"messages": messages, "images": images, "source": source}
    kind = record.get("type")  # an optional question type: evaluation reports accuracy per type
    if kind is not None:
        if not isinstance(kind, str):
            raise DataError(source, WRONG_SCHEMA, "field 'type' (the question type) must be a string")
        sample["kind"] = kind
    return sample


def caption_sample(record: Any, source: str, image_root: Path, prompt: str = CAPTION_PROMPT) -> dict:
    image = _field(record, "image", source)
    caption = _answer(_field(record, "caption", source), source)
    return caption_messages(str(image_root / image), caption, source, prompt)


def caption_messages(image: Any, caption: str, source: str, prompt: str = CAPTION_PROMPT) -> dict:
    messages = [
        {"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{prompt}"},
        {"role": "assistant", "content": caption},
    ]
    return {"messages": messages, "images": [image], "source": source}


def alpaca_sample(record: Any, source: str) -> dict:
    instruction = _field(record, "instruction", source)
    extra = _field(record, "input", source, required=False)
    output = _answer(_field(record, "output", source), source)
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}],
            "images": [], "source": source}


# -- readers ------------------------------------------------------------------------------------------------------
def _root(path: str | os.PathLike, image_root: str | os.PathLike | None) -> Path:
    return Path(image_root) if image_root is not None else Path(path).parent


def read_llava(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> Records:
    return Records(RecordFile(path), partial(llava_sample, image_root=_root(path, image_root)))


def read_alpaca(path: str | os.PathLike) -> Records:
    return Records(RecordFile(path), alpaca_sample)


def read_captions(
    path: str | os.PathLike, image_root: str | os.PathLike | None = None, prompt: str = CAPTION_PROMPT
) -> Records | SampleList:
    """Caption rows `{"image", "caption"}` (JSONL or JSON array), or a COCO captions file."""
    root = _root(path, image_root)
    file = RecordFile(path)
    if not file.is_array and _looks_like_coco(file):
        return read_coco_captions(path, image_root, prompt)
    return Records(file, partial(caption_sample, image_root=root, prompt=prompt))


def read_coco_captions(
    path: str | os.PathLike, image_root: str | os.PathLike | None = None, prompt: str = CAPTION_PROMPT
) -> SampleList:
    """One sample per annotation of a COCO captions file; rows are numbered by annotation (1-based)."""
    path, root = Path(path), _root(path, image_root)
    if not path.is_file():
        raise DataError(str(path), "data file not found")
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
        files = {image["id"]: image["file_name"] for image in data["images"]}
        annotations = data["annotations"]
    except json.JSONDecodeError as error:
        raise DataError(str(path), INVALID_JSON, str(error)) from None
    except UnicodeDecodeError as error:
        raise not_utf8(path, error, len(raw)) from None
    except (KeyError, TypeError) as error:
        raise DataError(str(path), WRONG_SCHEMA, f"a COCO captions file needs images[].id/file_name and "
                                                 f"annotations[] ({error!r})") from None
    return SampleList(_LazyCoco(path.name, files, annotations, root, prompt))


class _LazyCoco:
    """Builds COCO samples on access, so a bad annotation surfaces as a DataError of its own row."""

    def __init__(self, name, files, annotations, root, prompt):
        self.name, self.files, self.annotations, self.root, self.prompt = name, files, annotations, root, prompt

    def __len__(self) -> int:
        return len(self.annotations)

    def __getitem__(self, index: int) -> dict:
        source = f"{self.name}:annotation {index + 1}"
        annotation = self.annotations[index]
        image_id = _field(annotation, "image_id", source, (int, str))
        if image_id not in self.files:
            raise DataError(source, WRONG_SCHEMA, f"image_id {image_id} is not in the file's images")
        caption = _answer(_field(annotation, "caption", source), source)
        return caption_messages(str(self.root / self.files[image_id]), caption, source, self.prompt)


def _looks_like_coco(file: RecordFile) -> bool:
    """A one-line JSON object with `annotations`, as COCO ships them (format="coco" reads pretty-printed ones)."""
    for _, record in file.stream():
        return isinstance(record, dict) and "annotations" in record
    return False


def read_dataset(path: str | os.PathLike, format: str, image_root: str | os.PathLike | None = None,
                 caption_prompt: str = CAPTION_PROMPT) -> Records | SampleList:
    """Open a data file in one of FORMATS ("caption" also reads COCO files); `~` in either path is the home folder."""
    path, image_root = Path(path).expanduser(), image_root and Path(image_root).expanduser()
    if format == "llava":
        return read_llava(path, image_root)
    if format == "coco":
        return read_coco_captions(path, image_root, caption_prompt)
    if format == "caption":
        return read_captions(path, image_root, caption_prompt)
    if format == "alpaca":
        return read_alpaca(path)
    raise ConfigError(f"data format {format!r} is not known; use one of {', '.join(FORMATS)}")
