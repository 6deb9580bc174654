"""Test-time views: a model's class probabilities averaged over an image and its shifts.

    probs = class_probabilities(model, images, mean, std, views=5, device=dev, batch=256)
    metrics = split_metrics(probs, labels, num_classes, "test")  # test/loss, acc, bacc, images

A network trained on randomly shifted characters still answers a little differently for the
same character one pixel off; averaging its softmax over the image as is and moved one pixel
up, down, left and right (5 views) evens that out (what it is worth: docs/benchmarks.md). The
test split, `final` and `predict` use `trainer.test_views`; the validation split stays one
view, because it is scored after every epoch of every trial.
"""

from __future__ import annotations

import torch
from torch import nn

from kmnist_sweep.config.schema import TEST_VIEW_COUNTS
from kmnist_sweep.train.loader import to_input
from kmnist_sweep.train.metrics import balanced_accuracy, recall_counts

# (rows down, columns right) of each view, in the order `views` takes them: the image, its
# four one-pixel neighbours, then the four diagonal ones.
SHIFTS = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1))


def views_text(views: int) -> str:
    """`1 view`, `5 views`: how output lines name the count."""
    return f"{views} view" + ("" if views == 1 else "s")


def shift_images(images: torch.Tensor, down: int, right: int) -> torch.Tensor:
    """uint8 (N, H, W) images moved `down` rows and `right` columns (negative: up, left);
    the rows and columns brought in are 0, the black background of a scan."""
    if down == 0 and right == 0:
        return images
    _, h, w = images.shape
    out = torch.zeros_like(images)
    rows_to = slice(max(down, 0), h + min(down, 0))
    rows_from = slice(max(-down, 0), h + min(-down, 0))
    cols_to = slice(max(right, 0), w + min(right, 0))
    cols_from = slice(max(-right, 0), w + min(-right, 0))
    out[:, rows_to, cols_to] = images[:, rows_from, cols_from]
    return out


def class_probabilities(
    model: nn.Module,
    images: torch.Tensor,
    mean: float,
    std: float,
    *,
    views: int,
    device: torch.device,
    batch: int,
) -> torch.Tensor:
    """Softmax over the classes, (N, C) float32 on the CPU, of uint8 (N, H, W) `images`,
    averaged over the first `views` of SHIFTS. fp32 and eval mode (the mode is restored)."""
    if views not in TEST_VIEW_COUNTS:
        raise ValueError(f"views={views}: one of {TEST_VIEW_COUNTS}")
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode():
            for chunk in torch.split(images, batch):
                chunk = chunk.to(device)
                total = None
                for down, right in SHIFTS[:views]:
                    x = to_input(shift_images(chunk, down, right), mean, std)
                    probs = torch.softmax(model(x).float(), dim=-1)
                    total = probs if total is None else total + probs
                assert total is not None
                out.append((total / views).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros((0, 0))


def split_metrics(
    probs: torch.Tensor, labels: torch.Tensor, num_classes: int, prefix: str
) -> dict[str, float]:
    """Cross-entropy of the (averaged) probabilities, accuracy, balanced accuracy (mean
    per-class recall over the classes present) and the image count, keyed `prefix/...`."""
    labels = labels.cpu()
    if len(labels) == 0:
        return {f"{prefix}/{k}": 0.0 for k in ("loss", "acc", "bacc", "images")}
    preds = probs.argmax(dim=-1)
    hits, total = recall_counts(labels, preds, num_classes)
    picked = probs[torch.arange(len(labels)), labels].clamp_min(1e-12)
    return {
        f"{prefix}/loss": float(-picked.log().mean()),
        f"{prefix}/acc": float((preds == labels).float().mean()),
        f"{prefix}/bacc": balanced_accuracy(hits, total),
        f"{prefix}/images": float(len(labels)),
    }
