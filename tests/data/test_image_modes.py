"""Images read right: every PIL mode becomes the RGB a viewer shows (16-bit levels scaled, not clipped to white;
transparent pixels on white), and an image over PIL's decompression-bomb limit is one DataError naming the file."""
import numpy as np
import pytest
from PIL import Image

from peft_vlm.data import load_image
from peft_vlm.errors import DataError

MID = np.full((4, 4), 32768, dtype=np.uint16)  # half of 16-bit full scale


@pytest.mark.parametrize("mode", ["I;16", "I", "I;16B"])
def test_a_16_bit_grey_image_of_half_scale_becomes_mid_grey_not_white(mode, tmp_path):
    if mode == "I;16B":
        image = Image.frombytes(mode, MID.shape[::-1], MID.astype(">u2").tobytes())
    else:
        image = Image.fromarray(MID).convert(mode) if mode == "I" else Image.fromarray(MID)
    assert image.mode == mode
    assert np.array_equal(np.asarray(load_image(image, "row 1")), np.full((4, 4, 3), 128, dtype=np.uint8))


def test_a_16_bit_png_file_becomes_mid_grey_not_white(tmp_path):
    Image.fromarray(MID).save(tmp_path / "grey16.png")
    assert np.asarray(load_image(tmp_path / "grey16.png", "row 1")).tolist() == np.full((4, 4, 3), 128).tolist()


def pixels(image):
    return [tuple(p) for p in np.asarray(load_image(image, "row 1")).reshape(-1, 3).tolist()]


def palette_with_transparency():
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255])
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0  # palette entry 0 (red) is transparent
    return image


@pytest.mark.parametrize("make, expected", [
    (lambda: Image.fromarray(np.array([[[100, 0], [100, 255]]], dtype=np.uint8), "LA"), [(255,) * 3, (100,) * 3]),
    (palette_with_transparency, [(255, 255, 255), (0, 0, 255)]),
    (lambda: Image.fromarray(np.array([[[0, 0, 0, 0], [0, 0, 0, 255]]], dtype=np.uint8), "RGBA"),
     [(255, 255, 255), (0, 0, 0)]),
    (lambda: Image.fromarray(np.array([[[0, 0, 0, 0], [0, 255, 255, 0]]], dtype=np.uint8), "CMYK"),
     [(255, 255, 255), (255, 0, 0)]),
    (lambda: Image.fromarray(np.array([[True, False]])), [(255, 255, 255), (0, 0, 0)]),
    (lambda: Image.fromarray(np.array([[0.5, 1.0]], dtype=np.float32)), [(128,) * 3, (255,) * 3]),
    (lambda: Image.fromarray(np.array([[64.0, 200.0]], dtype=np.float32)), [(64,) * 3, (200,) * 3]),
], ids=["LA", "P with transparency", "RGBA", "CMYK", "1", "F in 0..1", "F in 0..255"])
def test_every_mode_becomes_the_rgb_a_viewer_shows(make, expected):
    assert pixels(make()) == expected


@pytest.mark.parametrize("side", [12, 20], ids=["over the limit (PIL warns)", "over twice the limit (PIL raises)"])
def test_an_image_over_the_decompression_bomb_limit_is_one_data_error_naming_the_file(side, tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("RGB", (side, side)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DataError, match=f"^row 1: image too large \\({path}: Image size \\({side * side} pixels\\)"):
        load_image(path, "row 1")
