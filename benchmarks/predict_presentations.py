"""`predict` on held-out images as users have them, run by hand:
`python benchmarks/predict_presentations.py [--bundle model.zip] [--count N]`.

Takes the held-out test images of kmnist_sample (the 2,000 the bundle's `final` tested on),
writes each set of them as a user would have it (plain 28x28 PNGs; resized; JPEG; dark ink on
tinted paper; on a page with margins; phone JPEGs stored sideways with EXIF orientation 6 or
8; white ink on a transparent background), runs `python -m kmnist_sweep predict` on each
folder as a user does, and prints a markdown table of top-1 accuracy by presentation for
docs/predict.md. Without --bundle it makes one first, as the README does: a one-trial
batch-size sweep, then `final` for --epochs epochs (a few minutes on two cores).

`--measure-framing` prints instead how the training images are framed (the figures behind
kmnist_sweep/data/framing.py's constants).
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kmnist_sweep.data import framing  # noqa: E402
from kmnist_sweep.data.datasets import load_dataset  # noqa: E402
from kmnist_sweep.data.download import SAMPLE_DIR  # noqa: E402
from kmnist_sweep.data.formats import read_idx  # noqa: E402
from kmnist_sweep.results.bundle import read_bundle  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
BIG = 112  # pixels: a character as a phone photo or a scan crops it, before any margin
PAPER = (236, 226, 196)  # RGB: cream paper
INK = (40, 34, 60)  # RGB: blue-black ink
EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the transpose that stores an upright picture so that a viewer, which
# applies the orientation, shows it upright again (ImageOps.exif_transpose undoes it).
STORED = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "kmnist_sweep", *args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        sys.exit(f"{' '.join(args[:2])} failed: {done.stderr[-2000:]}")
    return done


def make_bundle(work: Path, epochs: int) -> Path:
    """The README's path: a one-trial batch-size sweep (no epoch), then `final` on it."""
    start = time.perf_counter()
    cli(
        "+sweep=batchsize",
        "data=kmnist_sample",
        "trainer.epochs=0",
        "study.pruner.max_resource=1",  # follows trainer.epochs, and must be >= 1
        "study.n_trials=1",
        "++search_space.trainer.batch_size.low=128",
        "++search_space.trainer.batch_size.high=128",
        "tracking=disabled",
        cwd=work,
    )
    study = work / "sweeps" / "batchsize-kmnist_sample"
    final = cli("final", str(study), f"trainer.epochs={epochs}", cwd=work)
    print(*[line for line in final.stdout.splitlines() if line.startswith("final: test/")])
    print(f"bundle made in {time.perf_counter() - start:.0f} s")
    return study / "model-trial0.zip"


def big(gray: Image.Image) -> Image.Image:
    return gray.resize((BIG, BIG), Image.Resampling.BILINEAR)


def on_paper(gray: Image.Image) -> Image.Image:
    """White-on-black `gray` as ink on tinted paper, RGB, with the paper's grain."""
    alpha = np.asarray(gray, dtype=np.float64)[..., None] / 255.0
    rgb = (1 - alpha) * np.array(PAPER) + alpha * np.array(INK)
    grain = np.random.default_rng(0).normal(0, 4, rgb.shape[:2])[..., None]
    return Image.fromarray(np.clip(rgb + grain, 0, 255).astype(np.uint8), "RGB")


def on_page(gray: Image.Image) -> Image.Image:
    """Dark ink on white, the character a third of a 320x240 page's height, off centre."""
    page = Image.new("L", (320, 240), 255)
    page.paste(ImageOps.invert(gray.resize((80, 80), Image.Resampling.BILINEAR)), (190, 40))
    return page


def transparent(gray: Image.Image) -> Image.Image:
    """White ink on a transparent background: the character is in the alpha channel."""
    rgba = Image.new("RGBA", gray.size, (255, 255, 255, 0))
    rgba.putalpha(gray)
    return rgba


def exif(orientation: int) -> Image.Exif:
    tags = Image.Exif()
    tags[EXIF_ORIENTATION] = orientation
    return tags


def save_sideways(gray: Image.Image, path: Path, orientation: int) -> None:
    """A phone's JPEG: the sensor's pixels stored sideways, the EXIF tag saying how."""
    upright = on_paper(big(gray))
    upright.transpose(STORED[orientation]).save(path, "JPEG", quality=90, exif=exif(orientation))
    with Image.open(path) as back:  # what a viewer shows is the upright picture
        assert ImageOps.exif_transpose(back).size == upright.size


Saver = Callable[[Image.Image, Path], None]
PRESENTATIONS: dict[str, tuple[str, Saver]] = {
    "plain": ("28x28 PNG, white on black, as in the dataset", lambda g, p: g.save(p)),
    "resized": (f"{BIG}x{BIG} PNG (bilinear)", lambda g, p: big(g).save(p)),
    "jpeg": (f"{BIG}x{BIG} JPEG, quality 75", lambda g, p: big(g).save(p, quality=75)),
    "tinted": (
        f"{BIG}x{BIG} JPEG q90, blue-black ink on cream paper with grain",
        lambda g, p: on_paper(big(g)).save(p, quality=90),
    ),
    "margins": (
        "320x240 PNG page, dark on white, the character 80 px, off centre",
        lambda g, p: on_page(g).save(p),
    ),
    "exif6": (
        "tinted JPEG stored sideways, EXIF orientation 6",
        lambda g, p: save_sideways(g, p, 6),
    ),
    "exif8": (
        "tinted JPEG stored sideways, EXIF orientation 8",
        lambda g, p: save_sideways(g, p, 8),
    ),
    "transparent": ("28x28 PNG, white ink on transparent", lambda g, p: transparent(g).save(p)),
}


def accuracy(bundle: Path, folder: Path, labels: list[int]) -> tuple[float, int]:
    """(top-1 accuracy, images marked blank) of `predict` on the folder's images."""
    done = cli("predict", str(bundle), str(folder), "--top-k", "1", "--csv", "p.csv", cwd=folder)
    with (folder / "p.csv").open(encoding="utf-8") as fh:
        top1 = {Path(row["image"]).stem: int(row["class"]) for row in csv.DictReader(fh)}
    hits = sum(top1[f"{i:05d}"] == label for i, label in enumerate(labels))
    return hits / len(labels), done.stderr.count("blank image")


def measure_framing() -> None:
    """How the bundled sample's images are framed, at framing.INK."""
    images = read_idx(SAMPLE_DIR / "t10k-images-idx3-ubyte.gz")
    ink = images >= framing.INK
    rows, cols = ink.any(axis=2), ink.any(axis=1)

    def span(mask: np.ndarray) -> np.ndarray:
        first = mask.argmax(axis=1)
        last = mask.shape[1] - 1 - mask[:, ::-1].argmax(axis=1)
        return last - first + 1

    fill = np.maximum(span(rows), span(cols)) / images.shape[1]
    border = np.concatenate(
        [images[:, 0], images[:, -1], images[:, 1:-1, 0], images[:, 1:-1, -1]], axis=1
    )
    print(f"{len(images)} images; the ink (>= {framing.INK}) bounding box's longer side:")
    print(f"  fills the frame in {np.mean(fill == 1):.1%}; mean fill {fill.mean():.3f}")
    print(f"  percentiles 1/5/50: {np.percentile(fill, [1, 5, 50]).round(3).tolist()}")
    print(f"  smallest fill {fill.min():.3f} (INK_FILL_MIN {framing.INK_FILL_MIN})")
    print(f"border median: largest {np.median(border, axis=1).max():.1f} (PAPER_BLACK_MAX)")
    print(f"brightest pixel: smallest {images.max(axis=(1, 2)).min()} (INK_CONTRAST_MIN)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="a kmnist_sample bundle (default: make one)")
    parser.add_argument("--epochs", type=int, default=4, help="final's epochs when making one")
    parser.add_argument("--count", type=int, default=2000, help="held-out images per set")
    parser.add_argument("--measure-framing", action="store_true")
    args = parser.parse_args()
    if args.measure_framing:
        measure_framing()
        return
    work = Path(tempfile.mkdtemp(prefix="predict-presentations-"))
    bundle = args.bundle.resolve() if args.bundle else make_bundle(work, args.epochs)
    test = load_dataset(OmegaConf.create(read_bundle(bundle).config).data).test
    picks = np.linspace(0, len(test.labels) - 1, min(args.count, len(test.labels))).astype(int)
    labels = [int(test.labels[i]) for i in picks]
    head = f"how the {len(picks)} held-out images are written"
    print(f"| presentation | {head} | top-1 | vs plain |")
    print("|---|---|---|---|")
    plain = None
    for name, (how, save) in PRESENTATIONS.items():
        folder = work / name
        folder.mkdir()
        suffix = ".jpg" if "JPEG" in how else ".png"
        for n, i in enumerate(picks):
            save(Image.fromarray(test.images[i].numpy()), folder / f"{n:05d}{suffix}")
        acc, blank = accuracy(bundle, folder, labels)
        plain = acc if plain is None else plain
        note = f" ({blank} blank)" if blank else ""
        print(f"| {name} | {how} | {acc:.1%}{note} | {100 * (acc - plain):+.1f} |", flush=True)


if __name__ == "__main__":
    main()
