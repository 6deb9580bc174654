"""Image files as the training data looks: one channel, the dataset's size, white ink on black.

    paths = image_files([Path("scans/"), Path("one.png")])   # folders give their PNG/JPEGs
    framed = read_image(path, 28)      # .pixels uint8 (28, 28), .inverted, .blank

A file is read upright (its EXIF orientation applied, as a phone's photo is shown), with a
transparent background made paper, as one grey channel; data/framing.py then frames the
character as the training images are. Files are untrusted: anything Pillow cannot decode,
and images over MAX_PIXELS, are one-line DataErrors (tests/fuzz/ fuzzes this reader).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from kmnist_sweep.data.framing import LIGHT_BORDER, Framed, frame_character
from kmnist_sweep.errors import DataError, error_line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # what a folder contributes
FORMATS = ("PNG", "JPEG")  # what Pillow must find inside a file, whatever its name
# Pixels an image may have: Pillow's own decompression-bomb limit (a quarter of a GB as
# RGBA); a 40000x2000 strip is within it.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


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


def read_image(path: Path, size: int) -> Framed:
    """The PNG or JPEG at `path`, at any size, colour mode or EXIF orientation, as the
    model's (size, size) input: upright, grayscale, white ink on black, framed like the
    training images (data/framing.py). Anything Pillow cannot decode is a DataError."""
    with warnings.catch_warnings():
        # Pillow warns of images over its limit (MAX_PIXELS, refused below with their size)
        # and refuses those over twice that itself; it warns of corrupt EXIF data too, in
        # lines of its own: the image is read without it.
        warnings.simplefilter("ignore")
        try:
            with Image.open(path) as img:
                kind = img.format
                if kind not in FORMATS:
                    raise DataError(f"{path}: a {kind} image; predict reads PNG or JPEG")
                _check_size(path, img.size)
                img.load()  # decode now: a truncated file fails here, not later
                gray = _flatten(ImageOps.exif_transpose(img))
        except Image.DecompressionBombError as exc:
            raise DataError(
                f"{path}: too large an image ({error_line(exc, typed=False)}); predict reads "
                f"up to {MAX_PIXELS // 1_000_000} megapixels: crop it to the character"
            ) from None
        except DataError:
            raise
        except Exception as exc:  # a decoder's error on an odd file is of any type
            raise DataError(
                f"{path}: not a readable PNG or JPEG image ({error_line(exc, typed=False)})"
            ) from None
    return frame_character(gray, size)


def _check_size(path: Path, dims: tuple[int, int]) -> None:
    w, h = dims
    if w * h > MAX_PIXELS:
        raise DataError(
            f"{path}: {w}x{h} pixels, more than predict reads ({MAX_PIXELS // 1_000_000} "
            "megapixels); crop it to the character"
        )
    if w < 1 or h < 1:
        raise DataError(f"{path}: an empty {w}x{h} image")


def _flatten(img: Image.Image) -> np.ndarray:
    """One 8-bit channel. A transparent background becomes paper of the colour that shows
    the ink: white under dark ink, black under light ink (judged by the opaque pixels)."""
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode == "P" and "transparency" in img.info
    ):
        rgba = img.convert("RGBA")
        shade = 0 if _ink_is_light(rgba) else 255
        paper = Image.new("RGBA", rgba.size, (shade, shade, shade, 255))
        return np.asarray(Image.alpha_composite(paper, rgba).convert("L"), dtype=np.uint8)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # a 16-bit grayscale PNG: 0-65535
        wide = np.clip(np.asarray(img), 0, 65535).astype(np.uint32)
        wide *= 255
        wide += 32767
        wide //= 65535
        return wide.astype(np.uint8)
    return np.asarray(img.convert("L"), dtype=np.uint8)


def _ink_is_light(rgba: Image.Image) -> bool:
    """Whether the visible pixels, weighted by their opacity, are light on average: then
    the ink is light. In bands of rows, so that a huge image needs no wide copy."""
    alpha = np.asarray(rgba.getchannel("A"))
    light = np.asarray(rgba.convert("L"))
    step = max(1, 2**20 // alpha.shape[1])
    shown = weight = 0
    for top in range(0, alpha.shape[0], step):
        band = alpha[top : top + step].astype(np.int64)
        shown += int((band * light[top : top + step]).sum())
        weight += int(band.sum())
    return weight > 0 and shown > LIGHT_BORDER * weight
