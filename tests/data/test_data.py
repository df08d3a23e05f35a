"""Training data: readers, answer-only labels, bad-row reports, image geometry, lazy reading, batches."""
import json
import pickle

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from peft_vlm.data import (
    Collator,
    DataReport,
    ImageProcessor,
    SampleDataset,
    SampleEncoder,
    SampleList,
    read_alpaca,
    read_captions,
    read_dataset,
    open_dataset,
    read_llava,
    shuffled_order,
)
from peft_vlm.data import records
from peft_vlm.data import report as reasons
from peft_vlm.errors import ConfigError, DataError
from peft_vlm.data.prompting import IGNORE_INDEX, IMAGE_TOKEN_ID

TOKENS_PER_IMAGE = 4


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def png(path, size=(8, 8), colour=(255, 0, 0)):
    Image.new("RGB", size, colour).save(path)
    return path.name


def llava_row(image="a.png", question="What is in the picture?", answer="A red circle."):
    row = {"conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]}
    if image is not None:
        row["image"] = image
    return row


def encoder(tokenizer, **options):
    return SampleEncoder(tokenizer, TOKENS_PER_IMAGE, ImageProcessor(32), **options)


def answer_ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def labelled(example):
    return [label for label in example["labels"] if label != IGNORE_INDEX]


# -- readers --------------------------------------------------------------------------------------------------------
def test_llava_row_becomes_user_and_assistant_messages_with_image_path(tmp_path):
    path = write_jsonl(tmp_path / "llava.jsonl", [llava_row()])
    sample = read_llava(path, image_root=tmp_path / "images")[0]
    assert [m["role"] for m in sample["messages"]] == ["user", "assistant"]
    assert sample["images"] == [str(tmp_path / "images" / "a.png")]
    assert sample["source"] == "llava.jsonl:row 1"


def test_llava_json_array_reads_the_same_rows_as_jsonl_across_read_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "_CHUNK", 7)  # rows and multi-byte characters straddle chunk boundaries
    rows = [llava_row(answer=f"Réponse {i} ✓") for i in range(5)]
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=2, ensure_ascii=False), encoding="utf-8")
    write_jsonl(tmp_path / "a.jsonl", rows)
    array, lines = read_llava(tmp_path / "a.json"), read_llava(tmp_path / "a.jsonl")
    assert len(array) == len(lines) == 5
    assert [array[i]["messages"] for i in (4, 0, 2)] == [lines[i]["messages"] for i in (4, 0, 2)]
    assert [s["messages"] for _, s in array.stream()] == [s["messages"] for _, s in lines.stream()]


def test_caption_jsonl_and_coco_file_give_the_same_samples(tmp_path):
    write_jsonl(tmp_path / "caps.jsonl", [{"image": "a.png", "caption": "A red circle."}])
    coco = {"images": [{"id": 7, "file_name": "a.png"}], "annotations": [{"image_id": 7, "caption": "A red circle."}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    jsonl, from_coco = read_captions(tmp_path / "caps.jsonl")[0], read_captions(tmp_path / "coco.json")[0]
    assert jsonl["messages"] == from_coco["messages"]
    assert jsonl["images"] == from_coco["images"] == [str(tmp_path / "a.png")]
    assert from_coco["source"] == "coco.json:annotation 1"


def test_alpaca_input_follows_the_instruction_and_has_no_image(tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl",
                       [{"instruction": "Name the capital.", "input": "France", "output": "Paris"}])
    sample = read_alpaca(path)[0]
    assert sample["messages"][0]["content"] == "Name the capital.\n\nFrance"
    assert sample["messages"][1]["content"] == "Paris" and sample["images"] == []


def test_unknown_format_or_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="'sharegpt'"):
        read_dataset(tmp_path / "x.jsonl", "sharegpt")
    with pytest.raises(DataError, match="nowhere.jsonl"):
        read_llava(tmp_path / "nowhere.jsonl")


# -- labels -------------------------------------------------------------------------------------------------------
def test_labels_cover_exactly_each_answer_and_eos_in_a_multi_turn_chat(tokenizer):
    messages = [{"role": "user", "content": "What is in the picture?"},
                {"role": "assistant", "content": "A red circle."},
                {"role": "user", "content": "Is there a shape?"}, {"role": "assistant", "content": "Yes."}]
    example = encoder(tokenizer).encode_text({"messages": messages, "source": "s"})
    assert labelled(example) == answer_ids(tokenizer, "A red circle.") + answer_ids(tokenizer, "Yes.")
    assert len(example["labels"]) == len(example["input_ids"])


def test_builtin_template_labels_answers_when_chat_template_is_off(tokenizer):
    messages = [{"role": "user", "content": "What is in the picture?"},
                {"role": "assistant", "content": "A red circle."}]
    example = encoder(tokenizer, use_chat_template=False).encode_text({"messages": messages, "source": "s"})
    prompt = tokenizer("USER: What is in the picture?\nASSISTANT:", add_special_tokens=False)["input_ids"]
    assert example["input_ids"] == prompt + answer_ids(tokenizer, "A red circle.")
    assert labelled(example) == answer_ids(tokenizer, "A red circle.")


def test_image_placeholder_becomes_one_run_of_sentinels_and_is_never_labelled(tokenizer, tmp_path):
    png(tmp_path / "a.png")
    sample = read_llava(write_jsonl(tmp_path / "d.jsonl", [llava_row()]))[0]
    example = encoder(tokenizer)(sample)
    ids = example["input_ids"]
    first = ids.index(IMAGE_TOKEN_ID)
    assert ids[first:first + TOKENS_PER_IMAGE] == [IMAGE_TOKEN_ID] * TOKENS_PER_IMAGE
    assert ids.count(IMAGE_TOKEN_ID) == TOKENS_PER_IMAGE
    assert IMAGE_TOKEN_ID not in example["labels"]
    assert example["pixel_values"].shape == (1, 3, 32, 32)


def test_single_turn_encoding_equals_the_models_own_tokenize(vlm_factory, tmp_path):
    model = vlm_factory()
    png(tmp_path / "a.png", size=(32, 32))
    sample = read_llava(write_jsonl(tmp_path / "d.jsonl", [llava_row(question="Colour?", answer="red")]))[0]
    example = SampleEncoder.for_model(model)(sample)
    batch = model.tokenize(["<image>\nColour?"], [Image.open(tmp_path / "a.png")], answers=["red"])
    assert example["input_ids"] == batch["input_ids"][0].tolist()
    assert example["labels"] == batch["labels"][0].tolist()
    assert torch.allclose(example["pixel_values"], batch["pixel_values"])


def test_template_that_changes_the_answer_text_is_reported_as_misaligned(tokenizer):
    altered = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="</s>", pad_token="<pad>")
    altered.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] | upper }}</s>{% endfor %}" \
                            "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    messages = [{"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "red"}]
    with pytest.raises(DataError, match="row 3: misaligned tokenization"):
        encoder(altered).encode_text({"messages": messages, "source": "d.jsonl:row 3"})


def test_answer_partly_cut_by_max_length_is_kept_and_flagged_truncated(tokenizer):
    messages = [{"role": "user", "content": "Colour?"},
                {"role": "assistant", "content": "The colour is red, blue, green."}]
    full = encoder(tokenizer).encode_text({"messages": messages, "source": "s"})
    cut = encoder(tokenizer, max_length=len(full["input_ids"]) - 3).encode_text({"messages": messages, "source": "s"})
    assert cut["truncated"] and cut["input_ids"] == full["input_ids"][:-3]
    assert labelled(cut)


def test_truncation_never_keeps_part_of_an_image(tokenizer):
    sample = {"messages": [{"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "red"},
                           {"role": "user", "content": "<image> and?"}, {"role": "assistant", "content": "blue"}],
              "images": [torch.zeros(3, 32, 32)], "source": "s"}
    text_only = encoder(tokenizer).encode_text({**sample, "messages": sample["messages"][:2], "images": []})
    example = encoder(tokenizer, max_length=len(text_only["input_ids"]) + 6)(sample)
    assert IMAGE_TOKEN_ID not in example["input_ids"] and example["pixel_values"] is None
    assert example["truncated"]


# -- bad rows ------------------------------------------------------------------------------------------------------
@pytest.fixture
def malformed(tmp_path):
    """One good row, then one row of each kind of fault; row number -> expected reason."""
    png(tmp_path / "a.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    long_question = "Describe the image in one sentence. " * 40
    rows = [llava_row(), llava_row(image="missing.png"), llava_row(image="corrupt.png"), llava_row(answer=" "),
            {"image": "a.png", "dialogue": []}, "{not json", llava_row(question=long_question), llava_row()]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    expected = {2: reasons.MISSING_IMAGE, 3: reasons.UNREADABLE_IMAGE, 4: reasons.NO_ANSWER, 5: reasons.WRONG_SCHEMA,
                6: reasons.INVALID_JSON, 7: reasons.TOO_LONG}
    return path, expected


def test_skip_policy_reports_each_bad_row_by_file_row_and_reason(tokenizer, malformed):
    path, expected = malformed
    dataset = SampleDataset(read_llava(path), encoder(tokenizer, max_length=64), bad_samples="skip")
    kept = [example["source"] for _, example in dataset.iter_from(0)]
    assert kept == ["bad.jsonl:row 1", "bad.jsonl:row 8"]
    assert ({e.source: e.reason for e in dataset.report.bad}
            == {f"bad.jsonl:row {r}": why for r, why in expected.items()})
    summary = dataset.report.summary()
    assert "8 rows seen, 6 bad" in summary and all(f"bad.jsonl:row {r}" in summary for r in expected)


def test_error_policy_stops_at_the_first_bad_row_naming_file_row_and_reason(tokenizer, malformed):
    path, _ = malformed
    dataset = open_dataset(path, "llava", encoder(tokenizer, max_length=64), bad_samples="error")
    with pytest.raises(DataError, match=r"bad.jsonl:row 2: missing image file \(.*missing.png\)"):
        list(dataset.iter_from(0))


def test_validate_finds_bad_rows_without_opening_images(tokenizer, malformed):
    path, expected = malformed
    report = SampleDataset(read_llava(path), encoder(tokenizer, max_length=64), bad_samples="skip").validate()
    image_faults = {reasons.MISSING_IMAGE, reasons.UNREADABLE_IMAGE}
    assert sorted(report.sources()) == sorted(f"bad.jsonl:row {r}" for r, why in expected.items()
                                              if why not in image_faults)


def test_broken_json_array_stops_with_an_error_naming_the_row(tmp_path):
    (tmp_path / "broken.json").write_text(json.dumps([llava_row(), llava_row()])[:-30])
    with pytest.raises(DataError, match="broken.json:row 2: invalid JSON"):
        list(read_llava(tmp_path / "broken.json").stream())


def test_unknown_policy_is_a_config_error_naming_the_parameter(tokenizer):
    with pytest.raises(ConfigError, match="bad_samples='ignore'"):
        SampleDataset(SampleList([]), encoder(tokenizer), bad_samples="ignore")


# -- images --------------------------------------------------------------------------------------------------------
def stripes(width=96, height=32):
    """Red, green and blue vertical stripes of equal width."""
    image = Image.new("RGB", (width, height))
    for index, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        image.paste(colour, (index * width // 3, 0, (index + 1) * width // 3, height))
    return image


def dominant(pixels):
    """0/1/2 for red/green/blue at each pixel of a normalised (3, H, W) tensor."""
    return pixels.argmax(0)


def test_resize_squashes_the_whole_image_into_the_square():
    pixels = ImageProcessor(32, "resize")(stripes())
    assert pixels.shape == (3, 32, 32)
    assert dominant(pixels)[16, [2, 16, 29]].tolist() == [0, 1, 2]


def test_crop_keeps_the_center_at_full_scale():
    pixels = ImageProcessor(32, "crop")(stripes())
    assert (dominant(pixels) == 1).all()


def test_letterbox_keeps_aspect_ratio_with_mean_colour_bands():
    pixels = ImageProcessor(32, "letterbox")(Image.new("RGB", (64, 32), (255, 0, 0)))
    assert pixels[:, :6].abs().max() < 0.05 and pixels[:, -6:].abs().max() < 0.05  # mean colour normalises to 0
    band = pixels[:, 10:22]
    assert (band[0] > 1.5).all() and (band[2] < -1).all()


def test_unknown_resize_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="resize='stretch'"):
        ImageProcessor(32, "stretch")


# -- laziness and order --------------------------------------------------------------------------------------------
def test_streaming_reads_first_rows_without_reaching_a_malformed_row_far_down(tokenizer, tmp_path):
    rows = [{"instruction": f"Say {i}.", "output": str(i)} for i in range(5000)] + ["{broken"]
    dataset = SampleDataset(read_alpaca(write_jsonl(tmp_path / "big.jsonl", rows)), encoder(tokenizer))
    stream = iter(dataset.stream())
    first = [next(stream)["source"] for _ in range(3)]
    assert first == ["big.jsonl:row 1", "big.jsonl:row 2", "big.jsonl:row 3"]
    assert dataset.records.file._starts is None  # no index was built


def test_resuming_at_a_position_continues_the_same_seeded_order(tokenizer, tmp_path):
    rows = [{"instruction": f"Say {i}.", "output": str(i)} for i in range(12)]
    dataset = SampleDataset(read_alpaca(write_jsonl(tmp_path / "a.jsonl", rows)), encoder(tokenizer))
    order = shuffled_order(len(dataset), seed=3, epoch=1)
    assert order == shuffled_order(12, seed=3, epoch=1) != shuffled_order(12, seed=3, epoch=2)
    full = [(p, e["source"]) for p, e in dataset.iter_from(0, order)]
    assert [(p, e["source"]) for p, e in dataset.iter_from(5, order)] == full[5:]


# -- batches -------------------------------------------------------------------------------------------------------
def test_collated_batch_goes_through_forward_with_a_loss(vlm_factory, tmp_path):
    model = vlm_factory()
    png(tmp_path / "a.png", size=(40, 20))
    rows = [llava_row(), {"conversations": [{"from": "human", "value": "Capital of France?"},
                                            {"from": "gpt", "value": "Paris"}]}]
    dataset = SampleDataset(read_llava(write_jsonl(tmp_path / "d.jsonl", rows)), SampleEncoder.for_model(model))
    batch = Collator.for_model(model)([dataset[0], dataset[1]])
    assert batch["pixel_values"].shape == (1, 3, 32, 32) and batch.sources == ["d.jsonl:row 1", "d.jsonl:row 2"]
    assert batch["input_ids"][1, 0] == model.tokenizer.pad_token_id and batch["attention_mask"][1, 0] == 0
    loss = model(**batch).loss
    assert torch.isfinite(loss)


def test_dataloader_workers_pass_skipped_rows_back_to_the_report(tokenizer, malformed):
    path, expected = malformed
    dataset = SampleDataset(read_llava(path), encoder(tokenizer, max_length=64), bad_samples="skip")
    loader = DataLoader(dataset.stream(), batch_size=3, num_workers=2, collate_fn=Collator(tokenizer.pad_token_id))
    report = DataReport()
    for batch in loader:
        report.add_batch(batch)
        assert len(batch) == 0 or (batch["labels"] != IGNORE_INDEX).any(1).all()
    assert report.seen == 8 and sorted(report.sources()) == sorted(f"bad.jsonl:row {r}" for r in expected)


def test_error_policy_raises_a_workers_bad_row_in_the_main_process_without_worker_traceback(tokenizer, malformed):
    path, _ = malformed
    dataset = SampleDataset(read_llava(path), encoder(tokenizer, max_length=64), bad_samples="error")
    loader = DataLoader(dataset.stream(), batch_size=3, num_workers=2, collate_fn=Collator(tokenizer.pad_token_id))
    with pytest.raises(DataError, match=r"^bad.jsonl:row \d: ") as caught:
        for batch in loader:
            DataReport().add_batch(batch)
    assert "Traceback" not in str(caught.value)


def test_dataset_pickles_for_spawned_workers(tokenizer, malformed):
    path, _ = malformed
    dataset = open_dataset(path, "llava", encoder(tokenizer, max_length=64), bad_samples="skip")
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy[0]["input_ids"] == dataset[0]["input_ids"]


def test_data_error_survives_pickling_with_its_fields():
    error = pickle.loads(pickle.dumps(DataError("d.jsonl:row 4", reasons.NO_ANSWER, "empty")))
    assert (error.source, error.reason, str(error)) == (
        "d.jsonl:row 4", reasons.NO_ANSWER, "d.jsonl:row 4: no assistant answer (empty)")
