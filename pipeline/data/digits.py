"""Any image of a digit -> a 28x28 MNIST-style array, as MNIST was made: white on black, fit to a
20x20 box, centred by mass. Bytes come from strangers: only the PNG and JPEG decoders parse
them, the pixel count is checked from the header first, and the image is brought down to a
working size before any conversion (the decoder's buffer is the only full-size colour copy)."""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

SIZE = 28
BOX = 20
INK_THRESHOLD = 0.2  # fraction of the darkest-to-brightest range that counts as ink
# Every MNIST test digit, even shrunk to 14x14, has a pixel far further than this from its
# background; a blank or uniform image has none (figures: bench/README.md).
NO_INK_CONTRAST = 0.2
ACCEPTED_FORMATS = ("PNG", "JPEG")
MAX_PIXELS = 4096 * 4096
# A digit filling a small part of a big photo still has tens of pixels at this side.
WORK_SIDE = 512

ImageErrorKind = Literal["unsupported_format", "too_large", "unreadable", "no_digit"]

# Signatures of formats we refuse, to name them in the refusal without parsing them:
# (name, offset, the leading bytes or their alternatives); the first match wins.
_SIGNATURES: tuple[tuple[str, int, bytes | tuple[bytes, ...]], ...] = (
    ("PNG", 0, b"\x89PNG\r\n\x1a\n"),
    ("JPEG", 0, b"\xff\xd8\xff"),
    ("GIF", 0, (b"GIF87a", b"GIF89a")),
    ("BMP", 0, b"BM"),
    ("TIFF", 0, (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")),
    ("WebP", 8, b"WEBP"),
    ("ICO", 0, b"\x00\x00\x01\x00"),
    ("CUR", 0, b"\x00\x00\x02\x00"),
    ("PSD", 0, b"8BPS"),
    ("AVIF", 4, b"ftypavif"),
    ("HEIF", 4, b"ftyp"),
    ("JPEG 2000", 0, (b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")),
    ("JPEG XL", 0, (b"\x00\x00\x00\x0cJXL \r\n\x87\n", b"\xff\x0a")),
    ("QOI", 0, b"qoif"),
    ("PDF", 0, b"%PDF"),
    ("SVG", 0, b"<svg"),
    ("XML", 0, b"<?xml"),
)


class ImageError(ValueError):
    """Bytes we do not turn into a digit; `kind` says why (the services map it to a status)."""

    def __init__(self, message: str, kind: ImageErrorKind) -> None:
        super().__init__(message)
        self.kind: ImageErrorKind = kind


def sniff_format(data: bytes) -> str | None:
    head = data[:64].lstrip()
    for name, offset, signatures in _SIGNATURES:
        if head[offset:].startswith(signatures):
            return name
    return None


def open_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The image's header read (nothing decoded yet): an accepted format, within the budget."""
    try:
        image = Image.open(io.BytesIO(data), formats=list(ACCEPTED_FORMATS))
    except Image.DecompressionBombError as error:
        message = f"{error} (the limit here is {max_pixels:,} pixels)"
        raise ImageError(message, "too_large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        named = sniff_format(data)
        if named in ACCEPTED_FORMATS:
            message = f"a damaged {named} image: its header is unreadable"
            raise ImageError(message, "unreadable") from None
        if named:
            message = f"{named} images are not accepted (accepted: {', '.join(ACCEPTED_FORMATS)})"
        else:
            message = f"not an image ({' or '.join(ACCEPTED_FORMATS)} expected)"
        raise ImageError(message, "unsupported_format") from None
    width, height = image.size
    if width * height > max_pixels:
        pixels = f"{width} x {height} pixels ({width * height:,})"
        raise ImageError(f"{pixels} exceed the limit of {max_pixels:,} pixels", "too_large")
    return image


def _load(image: Image.Image) -> Image.Image:
    """Decode the first frame, a JPEG already in gray and shrunk by libjpeg where it can."""
    width, height = image.size
    shrink = max(1.0, max(width, height) / (2 * WORK_SIDE))
    # A no-op but for JPEG, where libjpeg then decodes gray and up to 8 times smaller.
    image.draft("L", (max(1, int(width / shrink)), max(1, int(height / shrink))))
    try:
        image.load()
    except (OSError, SyntaxError, EOFError, ValueError) as error:
        message = f"a damaged or truncated {image.format} image: {error}"
        raise ImageError(message, "unreadable") from None
    return image


def _on_paper(image: Image.Image) -> Image.Image:
    """8-bit gray, transparency as white paper, long side within 2 * WORK_SIDE; shrunk before
    converting wherever Pillow can, so any other full-size copy is in a 1- or 2-byte mode."""
    factor = max(image.size) // WORK_SIDE if max(image.size) > 2 * WORK_SIDE else 1
    if image.mode.startswith("I;16"):  # convert("L") would clip 16-bit values, not scale them
        info = {key: value for key, value in image.info.items() if key != "transparency"}
        image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))
        image.info = info
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        image = image.convert("LA")
        if factor > 1:
            image = image.reduce(factor)  # premultiplied, so hidden colours do not bleed in
        gray, alpha = np.moveaxis(np.asarray(image, dtype=np.uint32), -1, 0)
        on_white = (gray * alpha + 255 * (255 - alpha) + 127) // 255
        info = image.info  # EXIF orientation is still to be applied
        image = Image.fromarray(on_white.astype(np.uint8))
        image.info = info
    else:
        if image.mode not in ("L", "RGB", "CMYK"):
            image = image.convert("L")  # 1-bit and palette images: reduce needs gray
        if factor > 1:
            image = image.reduce(factor)
        if image.mode != "L":
            image = image.convert("L")
    return ImageOps.exif_transpose(image) or image


def gray_to_mnist(gray: np.ndarray) -> np.ndarray:
    """Gray float32 in [0, 1], any polarity -> float32 (28, 28), white digit on black,
    centred by mass; ImageError("no_digit") when nothing stands out from the background."""
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    background = float(np.median(border))
    if background > 0.5:  # dark ink on light paper: invert to MNIST's polarity
        gray = 1.0 - gray
        background = 1.0 - background
    contrast = float(np.abs(gray - background).max())
    if contrast <= NO_INK_CONTRAST:
        raise ImageError(
            f"no digit: no pixel differs from the background by more than {NO_INK_CONTRAST:.0%} "
            f"(the most is {contrast:.1%})",
            "no_digit",
        )
    low, high = float(gray.min()), float(gray.max())
    gray = (gray - low) / (high - low)
    rows, cols = np.nonzero(gray > INK_THRESHOLD)
    digit = gray[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    scale = BOX / max(digit.shape)
    height, width = (max(1, round(side * scale)) for side in digit.shape)
    ink = Image.fromarray((digit * 255).astype(np.uint8))
    resized = ink.resize((width, height), Image.Resampling.LANCZOS)
    patch = np.asarray(resized, dtype=np.float32) / 255.0
    canvas = np.zeros((SIZE, SIZE), dtype=np.float32)
    mass = patch.sum()
    ys, xs = np.indices(patch.shape)
    centre_y = (ys * patch).sum() / mass if mass else patch.shape[0] / 2
    centre_x = (xs * patch).sum() / mass if mass else patch.shape[1] / 2
    top = min(max(round(SIZE / 2 - centre_y), 0), SIZE - height)
    left = min(max(round(SIZE / 2 - centre_x), 0), SIZE - width)
    canvas[top : top + height, left : left + width] = patch
    return np.clip(canvas, 0.0, 1.0)


def to_mnist(image: Image.Image) -> np.ndarray:
    """A PIL image (decoded or not) -> float32 (28, 28) in [0, 1] (see `gray_to_mnist`)."""
    return gray_to_mnist(np.asarray(_on_paper(image), dtype=np.float32) / 255.0)


def image_bytes_to_mnist(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Uploaded bytes -> float32 (28, 28); ImageError with a `kind` for anything refused."""
    return to_mnist(_load(open_image(data, max_pixels)))
