"""Bytes -> digit, with no model and no server: bounded decoding, formats, empty images."""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipeline.data.digits import (
    MAX_PIXELS,
    ImageError,
    image_bytes_to_mnist,
    sniff_format,
    to_mnist,
)
from pipeline.data.idx import parse_idx
from testkit.bombs import BOMBS, encode
from tests.conftest import mirror_folder


def kind_of(data: bytes, **options: int) -> tuple[str, str, float]:
    started = time.perf_counter()
    with pytest.raises(ImageError) as caught:
        image_bytes_to_mnist(data, **options)
    return caught.value.kind, str(caught.value), time.perf_counter() - started


@pytest.fixture(scope="module")
def mnist_test() -> np.ndarray:
    raw = (mirror_folder() / "t10k-images-idx3-ubyte.gz").read_bytes()
    return parse_idx(gzip.decompress(raw), 3, "t10k-images")


Colour = int | str | tuple[int, ...]


def digit_canvas(side: int, mode: str = "L", paper: Colour = 255, ink: Colour = 0) -> Image.Image:
    """A '1'-like bar of ink on paper, filling the middle of a `side` x `side` canvas."""
    image = Image.new(mode, (side, side), paper)
    draw = ImageDraw.Draw(image)
    draw.rectangle((side * 0.45, side * 0.2, side * 0.55, side * 0.8), fill=ink)
    return image


def assert_standing_bar(processed: np.ndarray) -> None:
    """What `digit_canvas` gives, whatever the route: a tall, narrow, centred stroke."""
    rows, cols = np.nonzero(processed > 0.5)
    assert rows.max() - rows.min() > 3 * (cols.max() - cols.min()), (rows, cols)
    assert abs(rows.mean() - 14) < 1.5, rows
    assert abs(cols.mean() - 14) < 1.5, cols


@pytest.mark.parametrize("name", BOMBS)
def test_bombs_are_refused_quickly_with_the_right_kind(name: str) -> None:
    build, expected = BOMBS[name]
    kind, message, seconds = kind_of(build())
    assert kind == expected, message
    assert seconds < 1.0, seconds


def test_too_large_names_the_dimensions_and_the_limit() -> None:
    _, message, _ = kind_of(encode(Image.new("1", (13000, 13000)), "PNG"))
    assert "13000 x 13000" in message
    assert f"{MAX_PIXELS:,}" in message
    kind, message, _ = kind_of(encode(Image.new("L", (100, 60)), "PNG"), max_pixels=5000)
    assert kind == "too_large"
    assert "100 x 60" in message
    assert "5,000" in message


@pytest.mark.parametrize(
    ("format", "name"),
    [("BMP", "BMP"), ("TIFF", "TIFF"), ("GIF", "GIF"), ("WEBP", "WebP"), ("ICO", "ICO")],
)
def test_other_formats_are_refused_by_content(format: str, name: str) -> None:
    data = encode(digit_canvas(64), format)
    kind, message, _ = kind_of(data)
    assert kind == "unsupported_format"
    assert message.startswith(f"{name} images are not accepted"), message
    assert sniff_format(data) == name


def test_non_images_and_damaged_images() -> None:
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    for data in (noise, b"definitely not a png", b"<svg xmlns='x'/>"):
        kind, message, _ = kind_of(data)
        assert kind == "unsupported_format", message
    png = encode(digit_canvas(64), "PNG")
    jpeg = encode(digit_canvas(64), "JPEG")
    for damaged in (png[:8] + b"\x00" * 40, png[: len(png) // 2], jpeg[:20]):
        kind, message, _ = kind_of(damaged)
        assert kind == "unreadable", message


@pytest.mark.parametrize("side", [1, 28, 300, 3000])
@pytest.mark.parametrize("format", ["PNG", "JPEG"])
@pytest.mark.parametrize("value", [0, 128, 255])
def test_empty_images_are_no_digit(side: int, format: str, value: int) -> None:
    kind, message, _ = kind_of(encode(Image.new("L", (side, side), value), format))
    assert kind == "no_digit", message


def test_transparent_and_colour_blanks_are_no_digit() -> None:
    for image in (
        Image.new("RGBA", (500, 400), (0, 0, 0, 0)),
        Image.new("RGB", (500, 400), (30, 120, 200)),
        Image.new("1", (500, 400), 1),
        Image.new("P", (64, 64), 3),
    ):
        kind, message, _ = kind_of(encode(image, "PNG"))
        assert kind == "no_digit", (image.mode, message)


SIZES = {28: None, 14: None, 100: 2000, 280: 300, 1000: 20}  # side: how many images (None: all)


def test_every_mnist_test_digit_is_accepted_at_many_sizes(mnist_test: np.ndarray) -> None:
    for side, count in SIZES.items():
        for inverted in (False, True):
            for index, digit in enumerate(mnist_test[:count]):
                image = Image.fromarray(255 - digit if inverted else digit)
                if side != 28:
                    image = image.resize((side, side), Image.Resampling.BILINEAR)
                data = encode(image, "PNG", compress_level=1)
                try:
                    processed = image_bytes_to_mnist(data)
                except ImageError as error:
                    pytest.fail(f"test image {index} at {side} px, inverted={inverted}: {error}")
                if index < 50:  # what an in-memory image gets: the preprocessing of before
                    np.testing.assert_array_equal(processed, to_mnist(image))


def test_an_animated_png_gives_its_first_frame() -> None:
    digit, blank = digit_canvas(80), Image.new("L", (80, 80), 255)
    animated = encode(digit, "PNG", save_all=True, append_images=[blank] * 20)
    np.testing.assert_array_equal(image_bytes_to_mnist(animated), to_mnist(digit))
    blank_first = encode(blank, "PNG", save_all=True, append_images=[digit])
    assert kind_of(blank_first)[0] == "no_digit"


def test_exif_orientation_is_honoured_after_shrinking() -> None:
    # Stored lying on its side with "rotate 90 clockwise to view" (6): the bar must stand.
    upright = digit_canvas(2400, "RGB", "white", "black")
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = encode(upright.rotate(90, expand=True), "JPEG", exif=exif.tobytes(), quality=95)
    assert_standing_bar(image_bytes_to_mnist(stored))


@pytest.mark.parametrize("format", ["PNG", "JPEG"])
def test_the_largest_accepted_upload_gives_a_digit(format: str) -> None:
    side = 4096
    data = encode(digit_canvas(side, "RGB", "white", "black"), format)
    assert len(data) < 4 * 1024 * 1024
    started = time.perf_counter()
    assert_standing_bar(image_bytes_to_mnist(data))
    assert time.perf_counter() - started < 2.0


def test_sixteen_bit_and_transparent_drawings_read_like_plain_ones(tmp_path: Path) -> None:
    plain = image_bytes_to_mnist(encode(digit_canvas(300), "PNG"))
    sixteen = np.asarray(digit_canvas(300), dtype=np.uint16) * 257
    np.testing.assert_array_equal(
        image_bytes_to_mnist(encode(Image.fromarray(sixteen), "PNG")), plain
    )
    drawing = digit_canvas(3000, "RGBA", (0, 0, 0, 0), (0, 0, 0, 255))  # a canvas export
    on_paper = image_bytes_to_mnist(encode(digit_canvas(3000), "PNG"))
    np.testing.assert_allclose(image_bytes_to_mnist(encode(drawing, "PNG")), on_paper, atol=0.02)
