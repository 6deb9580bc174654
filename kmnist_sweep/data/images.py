"""Image files as the training data looks: one channel, the dataset's size, white ink on black.

    paths = image_files([Path("scans/"), Path("one.png")])   # folders give their PNG/JPEGs
    pixels, inverted = read_image(path, 28)                     # uint8 (28, 28)

KMNIST, K49 and Kuzushiji-Kanji draw the characters in white on black. A scan or a drawing
is usually dark ink on light paper; `read_image` tells the two apart by the border (the
paper around a character) and inverts the second kind, so either works.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from kmnist_sweep.errors import DataError, error_line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # what a folder contributes
FORMATS = ("PNG", "JPEG")  # what Pillow must find inside a file, whatever its name
LIGHT_BORDER = 127  # 0-255: a border median above this is paper, so the ink is dark


def image_files(targets: Sequence[Path]) -> list[Path]:
    """The files named, plus the PNG and JPEG files directly inside each folder named (sorted
    by name); a missing path or a folder without images is a DataError."""
    found: list[Path] = []
    for target in targets:
        if target.is_dir():
            inside = sorted(
                p for p in target.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not inside:
                raise DataError(f"{target}: no PNG or JPEG images in this folder")
            found += inside
        elif target.is_file():
            found.append(target)
        else:
            raise DataError(f"{target}: no such file or folder")
    return found


def read_image(path: Path, size: int) -> tuple[np.ndarray, bool]:
    """(uint8 (size, size) pixels, whether they were inverted) of the PNG or JPEG at `path`,
    at any size or colour mode: grayscale, light ink on black, padded square, resized."""
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, not later
            kind = img.format
            gray = _flatten(img)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(
            f"{path}: not a readable PNG or JPEG image ({error_line(exc, typed=False)})"
        ) from None
    if kind not in FORMATS:
        raise DataError(f"{path}: a {kind} image; predict reads PNG or JPEG")
    pixels = np.asarray(gray, dtype=np.uint8)
    inverted = is_dark_on_light(pixels)
    if inverted:
        pixels = 255 - pixels
    return _square_resize(pixels, size), inverted


def is_dark_on_light(pixels: np.ndarray) -> bool:
    """Whether the ink is darker than the paper, judged by the median of the outer ring: the
    training images' border is black background, a scan's is paper. The median, because
    a stroke may touch the edge."""
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    return float(np.median(border)) > LIGHT_BORDER


def _flatten(img: Image.Image) -> Image.Image:
    """One 8-bit channel; a transparent background becomes white paper first."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(paper, rgba).convert("L")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # a 16-bit grayscale PNG: 0-65535
        wide = np.asarray(img, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(wide), 0, 255).astype(np.uint8))
    return img.convert("L")


def _square_resize(pixels: np.ndarray, size: int) -> np.ndarray:
    """Pad to a square with black (background after any inversion), so a character keeps
    its proportions, then resize with Lanczos (antialiased when shrinking)."""
    h, w = pixels.shape
    if h != w:
        side = max(h, w)
        square = np.zeros((side, side), dtype=np.uint8)
        top, left = (side - h) // 2, (side - w) // 2
        square[top : top + h, left : left + w] = pixels
        pixels = square
    if pixels.shape[0] == size:
        return pixels
    resized = Image.fromarray(pixels).resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(resized, dtype=np.uint8)
