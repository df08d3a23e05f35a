"""Lazy access to the rows of a JSONL file or a JSON array file, by streaming or by index.

Nothing keeps the rows in memory. Streaming reads one row at a time and never needs the whole file. Random access
(what a seeded, resumable shuffle needs) uses an index of byte offsets built by one streaming pass on first use:
16 bytes a row, so an index of ten million rows is 160 MB while the rows stay on disk. A JSON array is scanned with
the C JSON decoder one element at a time, so a 200 MB LLaVA file is never parsed into one big list.

Row numbers in sources are 1-based: the line number in a JSONL file, the element position in a JSON array.
"""
from __future__ import annotations

import codecs
import json
import os
from array import array
from pathlib import Path
from typing import Any, Iterator

from peft_vlm.data.report import INVALID_JSON
from peft_vlm.errors import DataError

_CHUNK = 1 << 20
_MAX_ROW_CHARS = 64 * _CHUNK  # a longer "row" means a syntax error, not a big element
_DECODER = json.JSONDecoder()


def row_source(path: Path, row: int) -> str:
    return f"{path.name}:row {row}"


class RecordFile:
    """The rows of one JSONL or JSON-array file. `stream()` yields `(row, record or DataError)`; `record(i)` and
    `source(i)` give the i-th row (0-based) through the offset index."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(str(self.path), "data file not found")
        self.is_array = _first_char(self.path) == "["
        self._starts: array | None = None
        self._ends = array("q")
        self._rows = array("q")

    # -- streaming --------------------------------------------------------------------------------------------------
    def stream(self) -> Iterator[tuple[int, Any]]:
        for row, _, _, record in self._scan():
            yield row, record

    def _scan(self) -> Iterator[tuple[int, int, int, Any]]:
        """(row, start byte, end byte, record or DataError) for every row."""
        return self._scan_array() if self.is_array else self._scan_lines()

    def _scan_lines(self):
        with open(self.path, "rb") as file:
            offset = 0
            for line_number, line in enumerate(file, start=1):
                start, offset = offset, offset + len(line)
                if line.strip():
                    yield line_number, start, offset, self._parse(line, line_number)

    def _scan_array(self):
        """Decode the elements of a top-level JSON array one by one from a sliding text window."""
        with open(self.path, "rb") as file:
            window = _Window(file, self.path)
            position, row = window.skip_space(0) + 1, 0  # past '['
            while True:
                position = window.skip_space(position)
                if position >= len(window.text):
                    raise DataError(row_source(self.path, row + 1), INVALID_JSON, "the array is not closed with ']'")
                if window.text[position] == "]":
                    return
                row += 1
                while True:
                    try:
                        record, end = _DECODER.raw_decode(window.text, position)
                        if end < len(window.text) or window.at_end:  # a number at the window's edge might go on
                            break
                    except json.JSONDecodeError as error:
                        if window.at_end or len(window.text) - position > _MAX_ROW_CHARS:
                            raise DataError(row_source(self.path, row), INVALID_JSON,
                                            f"{error.msg}; a broken JSON array cannot be read past "
                                            "this point") from None
                    position = window.more(position)
                yield row, window.byte_offset(position), window.byte_offset(end), record
                position = window.skip_space(end)
                if position < len(window.text) and window.text[position] == ",":
                    position += 1
                elif position >= len(window.text) or window.text[position] != "]":
                    raise DataError(row_source(self.path, row + 1), INVALID_JSON,
                                    f"expected ',' or ']' after row {row}")

    def _parse(self, raw: bytes, row: int) -> Any:
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return DataError(row_source(self.path, row), INVALID_JSON, str(error))

    # -- random access ----------------------------------------------------------------------------------------------
    def _index(self) -> array:
        if self._starts is None:
            starts = array("q")
            for row, start, end, _ in self._scan():
                starts.append(start)
                self._ends.append(end)
                self._rows.append(row)
            self._starts = starts
        return self._starts

    def __len__(self) -> int:
        return len(self._index())

    def source(self, index: int) -> str:
        self._index()
        return row_source(self.path, self._rows[index])

    def record(self, index: int) -> Any:
        """The parsed row, or a DataError if the row is not valid JSON."""
        starts = self._index()
        with open(self.path, "rb") as file:
            file.seek(starts[index])
            raw = file.read(self._ends[index] - starts[index])
        return self._parse(raw, self._rows[index])


class _Window:
    """The rest of a UTF-8 file as text, read a chunk at a time, with the byte offset of any text position.
    Offsets are asked for in increasing order, so each character is encoded once to count its bytes."""

    def __init__(self, file, path: Path):
        self.file, self.path = file, path
        bom = file.read(len(codecs.BOM_UTF8)) == codecs.BOM_UTF8
        file.seek(0)
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.text, self.at_end = "", False
        self.counted, self.counted_bytes = 0, len(codecs.BOM_UTF8) if bom else 0

    def byte_offset(self, position: int) -> int:
        self.counted_bytes += len(self.text[self.counted:position].encode("utf-8"))
        self.counted = position
        return self.counted_bytes

    def more(self, keep_from: int) -> int:
        """Drop the text before `keep_from` and read on; returns where `keep_from` now is (0)."""
        self.byte_offset(keep_from)
        pending = len(self.decoder.getstate()[0])  # bytes of a character the last chunk cut in two
        read_from, data = self.file.tell() - pending, self.file.read(_CHUNK)
        try:
            self.text = self.text[keep_from:] + self.decoder.decode(data, final=not data)
        except UnicodeDecodeError as error:
            raise not_utf8(self.path, error, read_from + pending + len(data)) from None
        self.counted, self.at_end = 0, not data
        return 0

    def skip_space(self, position: int) -> int:
        """The next non-space position, reading on as needed; len(text) at the end of the file."""
        while True:
            position = _skip(self.text, position)
            if position < len(self.text) or self.at_end:
                return position
            position = self.more(position)


def not_utf8(path: Path, error: UnicodeDecodeError, decoded_up_to: int) -> DataError:
    """The DataError of a byte that is not UTF-8: the file and the byte's offset in it (`decoded_up_to`: the offset
    just past the bytes that were being decoded; a decoder may have left a BOM out of `error.object`)."""
    offset = decoded_up_to - len(error.object) + error.start
    return DataError(str(path), "not UTF-8 text", f"byte 0x{error.object[error.start]:02x} at byte offset {offset}")


def _skip(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _first_char(path: Path) -> str:
    with open(path, "rb") as file:
        while chunk := file.read(4096):
            stripped = chunk.lstrip(b" \t\r\n\xef\xbb\xbf")
            if stripped:
                return chr(stripped[0])
    return ""
