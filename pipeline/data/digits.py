"""Any image of a digit -> a 28x28 MNIST-style array, the way MNIST itself was made.

MNIST digits are white on black, size-normalised to fit a 20x20 box (aspect kept), then
placed in 28x28 so that their centre of mass sits at the centre.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

SIZE = 28
BOX = 20
INK_THRESHOLD = 0.2  # fraction of the darkest-to-brightest range that counts as ink


class ImageError(ValueError):
    """Bytes that are not an image we can read."""


def decode(data: bytes) -> Image.Image:
    """PNG/JPEG/... bytes to a PIL image, with a clear error for anything else."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise ImageError(f"not a readable image: {error}") from None
    return image


def _grayscale(image: Image.Image) -> np.ndarray:
    image = ImageOps.exif_transpose(image) or image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels are paper: composite on white before dropping alpha.
        rgba = image.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(paper, rgba)
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def to_mnist(image: Image.Image) -> np.ndarray:
    """float32 (28, 28) in [0, 1], white digit on black, centred by mass."""
    gray = _grayscale(image)
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if np.median(border) > 0.5:  # dark ink on light paper: invert to MNIST's polarity
        gray = 1.0 - gray
    low, high = float(gray.min()), float(gray.max())
    if high - low < 1e-3:
        return np.zeros((SIZE, SIZE), dtype=np.float32)  # a blank image: no digit
    gray = (gray - low) / (high - low)
    rows, cols = np.nonzero(gray > INK_THRESHOLD)
    digit = gray[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    scale = BOX / max(digit.shape)
    height = max(1, round(digit.shape[0] * scale))
    width = max(1, round(digit.shape[1] * scale))
    resized = Image.fromarray((digit * 255).astype(np.uint8)).resize(
        (width, height), Image.Resampling.LANCZOS
    )
    patch = np.asarray(resized, dtype=np.float32) / 255.0
    canvas = np.zeros((SIZE, SIZE), dtype=np.float32)
    mass = patch.sum()
    ys, xs = np.indices(patch.shape)
    centre_y = (ys * patch).sum() / mass if mass else patch.shape[0] / 2
    centre_x = (xs * patch).sum() / mass if mass else patch.shape[1] / 2
    top = int(round(SIZE / 2 - centre_y))
    left = int(round(SIZE / 2 - centre_x))
    top = min(max(top, 0), SIZE - height)
    left = min(max(left, 0), SIZE - width)
    canvas[top : top + height, left : left + width] = patch
    return np.clip(canvas, 0.0, 1.0)


def image_bytes_to_mnist(data: bytes) -> np.ndarray:
    return to_mnist(decode(data))
