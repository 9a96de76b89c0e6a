"""Image input handling: modes, dtypes, sizes and the errors that say what to do."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from encoder.images import load_rgb, to_pixels


def test_rgba_is_composited_on_white():
    transparent_red = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    half_red = Image.new("RGBA", (4, 4), (255, 0, 0, 128))
    assert load_rgb(transparent_red).getpixel((0, 0)) == (255, 255, 255)
    r, g, b = load_rgb(half_red).getpixel((0, 0))
    assert r == 255 and 120 <= g <= 135 and g == b


@pytest.mark.parametrize(
    ("mode", "color", "expected"),
    [
        ("L", 100, (100, 100, 100)),
        ("LA", (100, 0), (255, 255, 255)),
        ("1", 1, (255, 255, 255)),
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
        ("I;16", 65535, (255, 255, 255)),
        ("I", 200, (200, 200, 200)),  # 8-bit values stored as int32
        ("I", 25700, (100, 100, 100)),  # 16-bit values (how PIL opens many 16-bit PNGs)
        ("F", 0.5, (128, 128, 128)),
    ],
)
def test_modes_become_rgb(mode, color, expected):
    image = load_rgb(Image.new(mode, (3, 2), color))
    assert image.mode == "RGB" and image.size == (3, 2)
    assert image.getpixel((0, 0)) == expected


def test_sixteen_bit_keeps_its_scale():
    image = Image.fromarray(np.full((2, 2), 32896, dtype=np.uint16))  # mid-grey on the 16-bit scale
    assert load_rgb(image).getpixel((0, 0)) == (128, 128, 128)


def test_palette_with_transparency():
    def blue_palette_image() -> Image.Image:
        image = Image.new("P", (2, 2), 0)
        image.putpalette([0, 0, 255] + [0] * 765)
        return image

    assert load_rgb(blue_palette_image()).getpixel((0, 0)) == (0, 0, 255)
    transparent = blue_palette_image()
    transparent.info["transparency"] = 0
    assert load_rgb(transparent).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize(
    "array",
    [
        np.full((5, 6), 7, np.uint8),
        np.full((5, 6, 1), 7, np.uint8),
        np.full((5, 6, 3), 7 * 257, np.uint16),
        np.concatenate([np.full((5, 6, 3), 7, np.uint8), np.full((5, 6, 1), 255, np.uint8)], axis=2),
        np.full((5, 6, 3), 7 / 255, np.float32),
    ],
)
def test_numpy_arrays(array):
    image = load_rgb(array)
    assert image.size == (6, 5) and image.getpixel((0, 0)) == (7, 7, 7)


def test_bad_arrays_are_refused():
    with pytest.raises(ValueError, match="channels last"):
        load_rgb(np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        load_rgb(np.full((4, 4), np.nan, np.float32))
    with pytest.raises(ValueError, match="dtype int64"):
        load_rgb(np.zeros((4, 4), np.int64))
    with pytest.raises(ValueError, match="cannot read an image from int"):
        load_rgb(3)


def test_paths(tmp_path):
    path = tmp_path / "a.png"
    Image.new("LA", (9, 7), (50, 255)).save(path)
    assert load_rgb(path).getpixel((0, 0)) == (50, 50, 50)
    assert load_rgb(str(path)).size == (9, 7)
    with pytest.raises(ValueError, match="does not exist"):
        load_rgb(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot decode"):
        load_rgb(tmp_path / "junk.png")


def test_too_many_pixels_is_refused_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(path)
    with pytest.raises(ValueError, match="300x200 = 60000 pixels"):
        load_rgb(path, max_pixels=50_000)
    with pytest.raises(ValueError, match="300x200"):
        load_rgb(Image.new("RGB", (300, 200)), max_pixels=50_000)


@pytest.mark.slow
def test_one_pixel_and_huge_images_are_resized():
    pixels = to_pixels([Image.new("RGB", (1, 1), (255, 0, 0))], 32, (0, 0, 0), (1, 1, 1))
    assert pixels.shape == (1, 3, 32, 32)
    assert pixels[0, 0].min() == 1.0 and pixels[0, 1].max() == 0.0
    huge = Image.new("L", (10000, 10000), 200)
    reduced = load_rgb(huge)
    assert max(reduced.size) <= 2048 * 2 and reduced.getpixel((0, 0)) == (200, 200, 200)
    assert to_pixels([huge], 32, (0, 0, 0), (1, 1, 1)).shape == (1, 3, 32, 32)


def test_to_pixels_normalises_and_names_the_bad_image():
    pixels = to_pixels([np.full((4, 4, 3), 255, np.uint8)], 8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert pixels.shape == (1, 3, 8, 8)
    assert pixels.sub(2.0).abs().max() < 1e-6
    with pytest.raises(ValueError, match="image 1: .*channels last"):
        to_pixels([np.zeros((4, 4), np.uint8), np.zeros((3, 5, 5), np.uint8)], 8, (0,) * 3, (1,) * 3)
    with pytest.raises(ValueError, match="list of images"):
        to_pixels(Image.new("RGB", (2, 2)), 8, (0,) * 3, (1,) * 3)
