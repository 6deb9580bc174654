"""A grayscale picture of one character framed as the training images are: white ink on
black, levels spanning black to white, the ink filling the square frame.

    framed = frame_character(gray, 28)   # Framed(pixels uint8 (28, 28), inverted, blank)

KMNIST, K49 and Kuzushiji-Kanji characters are white on black and scaled to fill a 28x28
box: the bounding box of the ink (pixels at a quarter of full ink or more) spans the whole
frame along its longer side in nine images in ten, and never less than INK_FILL_MIN of it.
A crop from a page keeps its margins, so its character would be a fraction of that size;
it is cut to the ink and framed the same way. An image already framed like the training
data is only padded square and resized, so a training image comes back unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

LIGHT_BORDER = 127  # 0-255: a border median above this is paper, so the ink is dark
INK = 64  # 0-255 after the levels: a pixel at a quarter of full ink or more is ink
# The smallest fraction of the frame's longer side that the ink's bounding box spans in the
# bundled KMNIST sample (python benchmarks/predict_presentations.py --measure-framing): an
# image below it has margins no training image has, and is cut to its ink.
INK_FILL_MIN = 0.6
INK_FILL = 1.0  # the training images' typical fraction: the ink touches the frame
# Levels: a training image's border is black or nearly (a stroke may cross it) and its ink
# reaches at least INK_CONTRAST_MIN (0-255); an image with lighter paper or fainter ink is
# stretched to black-to-white.
PAPER_BLACK_MAX = 8
INK_CONTRAST_MIN = 192
BLANK_CONTRAST = 16  # 0-255: less between paper and ink than this is a blank image


@dataclass(frozen=True)
class Framed:
    pixels: np.ndarray  # uint8 (size, size), white ink on black
    inverted: bool  # the picture was dark ink on light paper
    blank: bool  # no ink: the model sees an empty frame


def frame_character(gray: np.ndarray, size: int) -> Framed:
    """The uint8 2-D picture `gray` as the model's (size, size) input: polarity, levels,
    framing, Lanczos resize (antialiased when shrinking)."""
    inverted = is_dark_on_light(gray)
    pixels = 255 - gray if inverted else gray
    pixels, blank = _levels(pixels)
    top, left, side = _window(pixels)
    # A blank page has no ink to be dark or light: it is not reported as inverted.
    return Framed(_render(pixels, top, left, side, size), inverted and not blank, blank)


def is_dark_on_light(pixels: np.ndarray) -> bool:
    """Whether the ink is darker than the paper, judged by the median of the outer ring: the
    training images' border is black background, a scan's is paper. The median, because
    a stroke may touch the edge."""
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    return float(np.median(border)) > LIGHT_BORDER


def _levels(pixels: np.ndarray) -> tuple[np.ndarray, bool]:
    """(pixels with the paper black and the ink white, whether there is no ink). Tinted paper
    or faint ink is stretched (a lookup table: no copy wider than uint8); a training image,
    black around ink of full strength, is left as it is."""
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    paper, ink = int(np.median(border)), int(pixels.max())
    if ink - paper < BLANK_CONTRAST:
        return np.zeros_like(pixels), True
    if paper <= PAPER_BLACK_MAX and ink >= INK_CONTRAST_MIN:
        return pixels, False
    steps = (np.arange(256, dtype=np.float64) - paper) * 255.0 / (ink - paper)
    table = np.clip(np.rint(steps), 0, 255).astype(np.uint8)
    return table[pixels], False


def _window(pixels: np.ndarray) -> tuple[int, int, int]:
    """(top, left, side) of the square of `pixels` the model should see; it may reach past
    the picture's edges, which are black. The whole picture, padded square and centred,
    unless the ink fills less of it than any training image: then the ink's bounding box,
    padded square and centred, at the training images' fill."""
    h, w = pixels.shape
    side = max(h, w)
    whole = ((h - side) // 2, (w - side) // 2, side)
    ink = pixels >= INK
    rows = np.flatnonzero(ink.any(axis=1))
    if len(rows) == 0:  # faint strokes only: nothing to measure the ink by
        return whole
    cols = np.flatnonzero(ink.any(axis=0))
    del ink  # as large as the picture
    ink_h, ink_w = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
    if max(ink_h, ink_w) >= INK_FILL_MIN * side:
        return whole
    fit = max(1, round(max(ink_h, ink_w) / INK_FILL))
    top = int(rows[0]) + (ink_h - fit) // 2
    left = int(cols[0]) + (ink_w - fit) // 2
    return top, left, fit


def _render(pixels: np.ndarray, top: int, left: int, side: int, size: int) -> np.ndarray:
    """The (side x side) window at (top, left) of `pixels`, black beyond their edges, at
    (size, size). Only the part inside the picture is resized, then placed: a 40000x2000
    strip is never padded to 40000x40000."""
    h, w = pixels.shape
    if (top, left, side) == (0, 0, size) and (h, w) == (size, size):
        return pixels
    y0, y1 = max(top, 0), min(top + side, h)
    x0, x1 = max(left, 0), min(left + side, w)
    scale = size / side
    # The part's place in the output, in whole pixels; at least one pixel each way.
    oy0, ox0 = min(round((y0 - top) * scale), size - 1), min(round((x0 - left) * scale), size - 1)
    oh = max(1, min(round((y1 - top) * scale), size) - oy0)
    ow = max(1, min(round((x1 - left) * scale), size) - ox0)
    part = Image.fromarray(np.ascontiguousarray(pixels[y0:y1, x0:x1]))
    if part.size != (ow, oh):
        part = part.resize((ow, oh), Image.Resampling.LANCZOS)
    out = np.zeros((size, size), dtype=np.uint8)
    out[oy0 : oy0 + oh, ox0 : ox0 + ow] = np.asarray(part, dtype=np.uint8)
    return out
