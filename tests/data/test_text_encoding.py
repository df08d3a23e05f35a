"""A byte that is not UTF-8 in a JSON data file is one DataError naming the file and the byte's offset, never a
UnicodeDecodeError from deep inside the reader."""
import codecs
import json

import pytest

import peft_vlm as pv
from peft_vlm.data import read_dataset
from peft_vlm.data import records

ROW = {"conversations": [{"from": "human", "value": "What colour?"}, {"from": "gpt", "value": "Red."}]}


def every_row(dataset):
    return [dataset[i] for i in range(len(dataset))]


@pytest.mark.parametrize("bom", [b"", codecs.BOM_UTF8])
def test_a_non_utf8_byte_in_a_json_array_file_names_the_file_and_byte_offset(tmp_path, bom):
    head = bom + b"[" + json.dumps(ROW).encode() + b', {"conversations": "'
    path = tmp_path / "data.json"
    path.write_bytes(head + b"\xff\"}]")
    with pytest.raises(pv.DataError, match=f"data.json: not UTF-8 text \\(byte 0xff at byte offset {len(head)}\\)"):
        every_row(read_dataset(path, "llava"))


def test_a_non_utf8_byte_past_the_first_chunk_is_placed_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "_CHUNK", 7)  # characters cut between chunks, the bad byte in a later one
    head = ("[" + json.dumps({**ROW, "id": "é€"}) + ', {"conversations": "').encode()
    path = tmp_path / "data.json"
    path.write_bytes(head + b"\xc3\x28\"}]")
    with pytest.raises(pv.DataError, match=f"byte 0xc3 at byte offset {len(head)}"):
        every_row(read_dataset(path, "llava"))


def test_a_non_utf8_byte_in_a_coco_file_names_the_file_and_byte_offset(tmp_path):
    head = b'{"images": [], "annotations": [], "info": "'
    path = tmp_path / "captions.json"
    path.write_bytes(head + b'\xfe"}')
    with pytest.raises(pv.DataError, match=f"captions.json: not UTF-8 text \\(byte 0xfe at byte offset {len(head)}\\)"):
        read_dataset(path, "coco")
