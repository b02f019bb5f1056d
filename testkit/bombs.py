"""Hostile and odd uploads, built in memory: shared by the preprocessing and serving tests and
the upload benchmark."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable

from PIL import Image


def encode(image: Image.Image, format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def png_claiming(width: int, height: int, mode: str = "RGB") -> bytes:
    """A PNG whose header says `width` x `height` but whose data is a few bytes."""
    data = bytearray(encode(Image.new(mode, (8, 8)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A JPEG whose frame header says `width` x `height` over an 8 x 8 picture."""
    data = bytearray(encode(Image.new("L", (8, 8), 128), "JPEG"))
    frame = data.index(b"\xff\xc0")
    data[frame + 5 : frame + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def many_frames_gif() -> bytes:
    frames = [Image.new("L", (1000, 1000), value) for value in range(0, 250, 5)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:])


# name: (builder, the ImageError kind it must get)
BOMBS: dict[str, tuple[Callable[[], bytes], str]] = {
    "huge blank PNG": (lambda: encode(Image.new("1", (13000, 13000)), "PNG"), "too_large"),
    "huge JPEG": (lambda: jpeg_claiming(13000, 13000), "too_large"),
    "PNG over Pillow's own limit": (lambda: png_claiming(20000, 20000), "too_large"),
    "PNG claiming 4000 x 4000": (lambda: png_claiming(4000, 4000), "unreadable"),
    "animated GIF, 50 frames": (many_frames_gif, "unsupported_format"),
}
