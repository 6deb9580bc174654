"""How far a validation metric could move on another draw of as many images: its standard
error, by a rule that fits the metric.

    errors = standard_errors(preds, labels, losses, num_classes)   # {"val/acc": 0.004, ...}

- accuracy, a fraction of n images right: binomial, sqrt(p (1 - p) / n);
- balanced accuracy, the mean over C classes of each class's recall p_c on n_c images:
  sqrt(sum_c p_c (1 - p_c) / n_c) / C, so a class with a handful of images weighs as much
  as its few images warrant (K49's and Kanji's rare classes);
- loss, a mean of per-image losses: their standard deviation / sqrt(n).

A sweep compares sizes or trials within two of these; a metric without a rule here (a cost
such as speed/train_s) has no band and the answer says so.
"""

from __future__ import annotations

import math

import torch

from kmnist_sweep.train.metrics import recall_counts

RULES = {
    "val/acc": "binomial on the validation images",
    "val/bacc": "from the per-class recalls and class counts",
    "val/loss": "from the per-image losses",
}


def standard_errors(
    preds: torch.Tensor, labels: torch.Tensor, losses: torch.Tensor | None, num_classes: int
) -> dict[str, float]:
    """Standard errors of val/acc, val/bacc and (with per-image `losses`) val/loss."""
    labels = labels.flatten().long().cpu()
    preds = preds.flatten().long().cpu()
    n = len(labels)
    if n == 0:
        return {}
    right = (preds == labels).double()
    p = float(right.mean())
    out = {"val/acc": math.sqrt(p * (1 - p) / n)}
    hits, counts = (c.double() for c in recall_counts(labels, preds, num_classes))
    seen = counts > 0
    recall = hits[seen] / counts[seen]
    variance = float((recall * (1 - recall) / counts[seen]).sum())
    out["val/bacc"] = math.sqrt(variance) / int(seen.sum())
    if losses is not None and len(losses) > 1:
        out["val/loss"] = float(losses.double().std()) / math.sqrt(len(losses))
    return out
