"""The figures of one split in a report (a sweep's validation split): the confusion matrix
(PNG and CSV) and a grid of misclassified images, labelled with the real characters in a
Japanese-capable font.

    matrix = confusion_matrix(labels, preds, num_classes)
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from matplotlib import font_manager, ft2font
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties

log = logging.getLogger(__name__)

MAX_ANNOTATED_CLASSES = 20  # confusion cells carry their count up to this many classes
MAX_PLOTTED_CLASSES = 60  # larger confusion matrices show the classes with the most errors
MAX_MATRIX_CSV_CLASSES = 100  # above this confusion.csv lists non-zero cells instead
GRID_SIDE = 6  # misclassified images: at most GRID_SIDE x GRID_SIDE
CONFUSION_CSV = "confusion.csv"
# The font a pip install brings (matplotlib-fontja's IPAexGothic: kana and JIS kanji), found
# without importing the package, which would change matplotlib's global font settings.
SHIPPED_FONT = ("matplotlib_fontja", "fonts/ipaexg.ttf")
# Installed Japanese-capable families, tried after the shipped font (for kanji it lacks).
CJK_FONT_NAMES = re.compile(
    r"Sans CJK|CJK|Source Han|IPAex?Gothic|IPA|Takao|Noto Sans JP|Droid Sans Fallback|"
    r"WenQuanYi|Hiragino|Yu Gothic|Meiryo|MS Gothic",
    re.IGNORECASE,
)


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts[true, predicted] as a (num_classes, num_classes) int64 array."""
    labels = np.asarray(labels, dtype=np.int64).ravel()
    preds = np.asarray(preds, dtype=np.int64).ravel()
    if labels.shape != preds.shape:
        raise ValueError(f"{labels.size} labels but {preds.size} predictions")
    for name, values in (("labels", labels), ("predictions", preds)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} outside 0..{num_classes - 1}")
    flat = np.bincount(labels * num_classes + preds, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def write_confusion_csv(path: Path, matrix: np.ndarray, names: Sequence[str]) -> None:
    """A square table (rows true, columns predicted) up to MAX_MATRIX_CSV_CLASSES classes;
    beyond that (Kuzushiji-Kanji: 3832) the non-zero cells, one per row."""
    with path.open("w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        if len(names) <= MAX_MATRIX_CSV_CLASSES:
            out.writerow(["true\\predicted", *names])
            for name, row in zip(names, matrix, strict=True):
                out.writerow([name, *row.tolist()])
        else:
            out.writerow(["true_index", "true", "predicted_index", "predicted", "count"])
            for t, p in zip(*(i.tolist() for i in np.nonzero(matrix)), strict=True):
                out.writerow([t, names[t], p, names[p], matrix[t, p]])


def plot_confusion(
    matrix: np.ndarray, names: Sequence[str], font: FontProperties | None, split: str
) -> Figure:
    """`split` names the images counted ("validation" in a sweep's report)."""
    shown = np.arange(len(names))
    title = f"Confusion matrix ({split}): rows true, columns predicted"
    if len(names) > MAX_PLOTTED_CLASSES:
        errors = matrix.sum(axis=1) - np.diag(matrix) + matrix.sum(axis=0) - np.diag(matrix)
        shown = np.sort(np.argsort(-errors, kind="stable")[:MAX_PLOTTED_CLASSES])
        title += f"; the {MAX_PLOTTED_CLASSES} classes with the most errors"
    cells = matrix[np.ix_(shown, shown)]
    labels = tick_labels([names[i] for i in shown.tolist()], font)
    side = max(4.0, 0.32 * len(shown) + 1.5)
    figure = Figure(figsize=(side + 1.2, side))
    ax = figure.subplots()
    image = ax.imshow(cells, cmap="Blues")
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label=f"{split} images")
    ticks = np.arange(len(shown))
    size = 11 if len(shown) <= MAX_ANNOTATED_CLASSES else 7
    ax.set_xticks(ticks, labels, fontproperties=font, fontsize=size, rotation=0 if font else 90)
    ax.set_yticks(ticks, labels, fontproperties=font, fontsize=size)
    ax.grid(False)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    if len(shown) <= MAX_ANNOTATED_CLASSES:
        dark = cells.max() * 0.6  # white text on the darkest cells
        for (i, j), count in np.ndenumerate(cells):
            if count:
                colour = "white" if count > dark else "black"
                ax.text(j, i, str(count), ha="center", va="center", fontsize=7, color=colour)
    return figure


def plot_misclassified(
    images: np.ndarray,
    labels: np.ndarray,
    preds: np.ndarray,
    names: Sequence[str],
    font: FontProperties | None,
    split: str,
) -> Figure:
    """The first GRID_SIDE² misclassified images of `split`, titled "true→predicted"."""
    wrong = np.flatnonzero(labels != preds)[: GRID_SIDE * GRID_SIDE]
    if wrong.size == 0:
        raise SkipPlot(f"none: every {split} image was classified correctly")
    cols = min(GRID_SIDE, wrong.size)
    rows = -(-wrong.size // cols)
    figure = Figure(figsize=(1.5 * cols, 1.7 * rows))
    axes = np.atleast_1d(figure.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, index in zip(axes, wrong, strict=False):
        true, pred = tick_labels([names[int(labels[index])], names[int(preds[index])]], font)
        ax.imshow(images[index], cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"{true}→{pred}", fontproperties=font, fontsize=12 if font else 7)
    return figure


def figure_text(figure: Figure) -> str:
    """Titles and axis labels of a figure (a colour bar is an axes too): its PNG text."""
    texts = [t for ax in figure.axes for t in (ax.get_title(), ax.get_xlabel(), ax.get_ylabel())]
    return " | ".join(t for t in texts if t)


# ---------------------------------------------------------------- Japanese labels


def tick_labels(names: Sequence[str], font: FontProperties | None) -> list[str]:
    """The characters themselves with a CJK font; code points ("U+304A") without one, since
    the default font would draw empty boxes."""
    if font is not None:
        return list(names)
    return [" ".join(f"U+{ord(c):04X}" if ord(c) > 0x7F else c for c in name) for name in names]


def find_cjk_font(text: str) -> FontProperties | None:
    """A font with a glyph for every character of `text`, or None (ASCII needs none)."""
    needed = frozenset(ord(c) for c in text if ord(c) > 0x7F)
    if not needed:
        return FontProperties()
    path = _font_covering(needed)
    return FontProperties(fname=path) if path else None


def shipped_font() -> str | None:
    """The path of the CJK font shipped by a dependency, or None where it is not installed."""
    spec = importlib.util.find_spec(SHIPPED_FONT[0])
    folders = list(spec.submodule_search_locations or []) if spec else []
    paths = [Path(folder, SHIPPED_FONT[1]) for folder in folders]
    return next((str(p) for p in paths if p.is_file()), None)


@functools.cache
def _font_covering(needed: frozenset[int]) -> str | None:
    tried: set[str] = set()
    for path in _font_candidates():
        if path in tried:
            continue
        tried.add(path)
        try:
            charmap = ft2font.FT2Font(path).get_charmap()
        except (OSError, RuntimeError, ValueError):
            continue
        if needed.issubset(charmap):
            return path
    log.info(
        "report: no installed font has all %d class characters; using code points", len(needed)
    )
    return None


def _font_candidates() -> Iterator[str]:
    """The shipped font first, so that a report looks the same on every machine; then the
    installed CJK fonts, Sans before Serif. matplotlib's font cache is built once and misses
    fonts installed later, so the system's font list is asked too."""
    shipped = shipped_font()
    if shipped:
        yield shipped
    known = [(f.name, f.fname) for f in font_manager.fontManager.ttflist]
    system = [(Path(p).stem, p) for p in font_manager.findSystemFonts()]
    candidates = [(name, path) for name, path in known + system if CJK_FONT_NAMES.search(name)]
    candidates.sort(
        key=lambda item: ("Serif" in item[0] or "Mincho" in item[0], "Bold" in item[1])
    )
    yield from (path for _, path in candidates)


class SkipPlot(Exception):
    """A plot that does not apply to this study (said in the page instead)."""
