"""Seed inputs for the fuzz targets: real image files and a real model bundle, in the forms
users have them (PNG of every mode, JPEG, EXIF-rotated JPEG, transparent PNG)."""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from PIL import Image

from kmnist_sweep.results.bundle import BUNDLE_JSON, WEIGHTS, make_bundle, write_bundle
from kmnist_sweep.train.model import build_model

REPO = Path(__file__).resolve().parents[2]
CHARACTERS = REPO / "examples" / "characters"
EXIF_ORIENTATION = 0x0112


def image_seeds() -> list[bytes]:
    """The shipped example characters as PNG, plus each of the other forms of the first."""
    seeds = [path.read_bytes() for path in sorted(CHARACTERS.glob("*.png"))]
    first = Image.open(sorted(CHARACTERS.glob("*.png"))[0]).convert("L")
    paper = Image.fromarray(255 - np.asarray(first))
    for image, kind, extra in [
        (paper.convert("RGB"), "JPEG", {}),
        (paper.convert("RGB"), "JPEG", {"exif": _exif(6)}),
        (paper.convert("L"), "JPEG", {"exif": _exif(8), "progressive": True}),
        (paper.convert("P"), "PNG", {"transparency": 255}),
        (_transparent(first), "PNG", {}),
        (first.convert("LA"), "PNG", {}),
        (first.convert("I;16"), "PNG", {}),
        (first.convert("1"), "PNG", {}),
    ]:
        buf = io.BytesIO()
        image.save(buf, kind, **extra)
        seeds.append(buf.getvalue())
    return seeds


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return exif.tobytes()


def _transparent(gray: Image.Image) -> Image.Image:
    """White ink on a transparent background: the ink is in the alpha channel."""
    rgba = Image.new("RGBA", gray.size, (255, 255, 255, 0))
    rgba.putalpha(gray)
    return rgba


def bundle_entries(folder: Path) -> tuple[bytes, bytes]:
    """(bundle.json, weights.pt) of a real bundle, as `final` writes it, of an untrained
    ResNet-18 for 10 classes; the weights cut to the output layer, so that a seed is
    kilobytes, not the 45 MB of a whole ResNet-18."""
    cfg = OmegaConf.create(
        {"model": {"arch": "resnet18", "stem": "imagenet", "pretrained": False}}
    )
    model = build_model(cfg.model, 10)
    bundle = make_bundle(
        cfg,
        classes=list("0123456789"),
        image_size=28,
        mean=0.2,
        std=0.3,
        views=1,
        model=model,
        data_name="synthetic",
        note="",
        files=(),
        source={"study": "fuzz", "trial": 0},
    )
    head = {k: v for k, v in bundle.state.items() if k.startswith("fc.")}
    write_bundle(folder / "seed.zip", replace(bundle, state=head))
    with zipfile.ZipFile(folder / "seed.zip") as zf:
        return zf.read(BUNDLE_JSON), zf.read(WEIGHTS)


def bundle_seeds(folder: Path) -> list[bytes]:
    """Real bundles, whole (a zip) and as the parts the bundle target rebuilds a zip from."""
    folder.mkdir(parents=True, exist_ok=True)
    meta, weights = bundle_entries(folder)
    v1 = json.dumps({**json.loads(meta), "format_version": 1}).encode()
    return [
        b"Z" + (folder / "seed.zip").read_bytes(),
        b"P" + len(meta).to_bytes(4, "big") + meta + weights,
        b"P" + len(v1).to_bytes(4, "big") + v1 + weights,
    ]
