"""Balanced accuracy, the one place it is computed: per-class recall counts, then their mean.

The training metric accumulates the counts batch by batch, the test views count once from
the averaged probabilities, and the report reads them off the confusion matrix's diagonal
and row sums; all three average the same way.
"""

from __future__ import annotations

import numpy as np
import torch


def recall_counts(
    labels: torch.Tensor, preds: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class: the images predicted right (hits) and the images there are (total)."""
    labels, preds = labels.cpu(), preds.cpu()
    total = torch.bincount(labels, minlength=num_classes)
    hits = torch.bincount(labels[preds == labels], minlength=num_classes)
    return hits, total


def balanced_accuracy(hits: torch.Tensor | np.ndarray, total: torch.Tensor | np.ndarray) -> float:
    """Mean recall over the classes present (a class with no images has no recall); 0.0
    when no class is present."""
    hits, total = np.asarray(hits, dtype=np.float64), np.asarray(total, dtype=np.float64)
    seen = total > 0
    return float((hits[seen] / total[seen]).mean()) if seen.any() else 0.0
