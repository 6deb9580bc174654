"""A bundle's model on new images, and on a split: the top-k characters and their probability.

    preds = run_predict(Path("model.zip"), [Path("scans/")], top_k=3, csv_path=None)
    preds = predict_files(bundle, model, files, top_k=3, device=device)   # the parts
    write_csv(Path("preds.csv"), preds)
    metrics = evaluate(model, bundle, dataset.test, device)   # {"test/acc": ..., ...}

Images are read and checked first (any bad file stops it before the model runs), then
classified in batches on the model's device. `final` measures its test metrics with
`evaluate`, the same code `predict` runs, so a printed accuracy is the saved model's.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from kmnist_sweep.config.device import pick_device
from kmnist_sweep.data.contract import Split
from kmnist_sweep.data.images import image_files, read_image
from kmnist_sweep.errors import UserError
from kmnist_sweep.files import check_writable_dir, write_atomic
from kmnist_sweep.results.bundle import Bundle, load_model, read_bundle
from kmnist_sweep.train.views import class_probabilities, split_metrics

BATCH = 256  # images per forward pass: small next to any GPU, quick on a CPU
BLANK = "a blank image (no ink stands out from its paper): its characters are guesses"


@dataclass(frozen=True)
class Prediction:
    path: Path
    inverted: bool  # the image was dark ink on light paper and was inverted
    blank: bool  # no ink was found: the top characters are the model's guess at nothing
    top: list[tuple[int, str, float]]  # (class index, character, probability), best first


def run_predict(
    bundle_path: Path, targets: Sequence[Path], top_k: int, csv_path: Path | None
) -> list[Prediction]:
    """`predict`: the bundle, then every input checked (top-k, CSV path, image files), then
    the model on the images, on CUDA when there is a GPU; the CSV written last."""
    bundle = read_bundle(bundle_path)
    if not 1 <= top_k <= len(bundle.classes):
        raise UserError(f"--top-k {top_k} is not in 1-{len(bundle.classes)} (classes)")
    if csv_path is not None:
        if csv_path.is_dir():
            raise UserError(f"--csv {csv_path} is a folder: name a file")
        check_writable_dir(csv_path.parent, f"--csv {csv_path} cannot be written")
    files = image_files(targets)
    device = pick_device("auto")
    preds = predict_files(bundle, load_model(bundle, bundle_path, device), files, top_k, device)
    if csv_path is not None:
        write_csv(csv_path, preds)
    return preds


def probabilities(
    model: nn.Module, bundle: Bundle, images: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """Softmax over the classes, (N, C) on the CPU, of uint8 (N, H, W) images, averaged over
    the bundle's test-time views, in batches."""
    if len(images) == 0:
        return torch.zeros((0, len(bundle.classes)))
    return class_probabilities(
        model, images, bundle.mean, bundle.std, views=bundle.views, device=device, batch=BATCH
    )


def evaluate(
    model: nn.Module, bundle: Bundle, split: Split, device: torch.device
) -> dict[str, float]:
    """Loss, accuracy and balanced accuracy (mean per-class recall) of the model on `split`."""
    probs = probabilities(model, bundle, split.images, device)
    return split_metrics(probs, split.labels, len(bundle.classes), "test")


def predict_files(
    bundle: Bundle,
    model: nn.Module,
    files: Sequence[Path],
    top_k: int,
    device: torch.device,
) -> list[Prediction]:
    """The top `top_k` characters of each image file, read as the training data looks."""
    pixels, read = [], []
    for path in tqdm(files, desc="reading images", unit="img", disable=None, leave=False):
        framed = read_image(path, bundle.image_size)
        pixels.append(torch.from_numpy(framed.pixels.copy()))  # Pillow arrays are read-only
        read.append(framed)
    images = torch.stack(pixels) if pixels else torch.zeros((0, bundle.image_size) * 2)
    probs = probabilities(model, bundle, images.to(torch.uint8), device)
    values, indices = probs.topk(top_k, dim=-1)
    return [
        Prediction(
            path,
            framed.inverted,
            framed.blank,
            [(int(i), bundle.classes[int(i)], float(p)) for p, i in zip(vs, ix, strict=True)],
        )
        for path, framed, vs, ix in zip(files, read, values, indices, strict=True)
    ]


def format_line(pred: Prediction) -> str:
    """`path  お 0.981  き 0.012  す 0.003` (and `[inverted]` for dark-on-light images,
    `[blank]` for images without ink)."""
    shown = "  ".join(f"{char} {p:.3f}" for _, char, p in pred.top)
    marks = ("  [inverted]" if pred.inverted else "") + ("  [blank]" if pred.blank else "")
    return f"{pred.path}  {shown}{marks}"


def write_csv(path: Path, preds: Sequence[Prediction]) -> None:
    """One row per image and rank: image, rank (1 = best), class index, character,
    probability (0-1), inverted."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image", "rank", "class", "character", "probability", "inverted"])
    for pred in preds:
        for rank, (index, char, p) in enumerate(pred.top, start=1):
            writer.writerow([str(pred.path), rank, index, char, f"{p:.6f}", int(pred.inverted)])
    write_atomic(path, buf.getvalue())
