"""Balanced accuracy: per-class recall counts, then their mean over the classes present."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kmnist_sweep.train.metrics import balanced_accuracy, recall_counts


def test_recall_counts_count_hits_and_images_per_class() -> None:
    labels = torch.tensor([0, 0, 0, 0, 1, 2])
    preds = torch.tensor([0, 0, 0, 1, 1, 1])
    hits, total = recall_counts(labels, preds, 4)
    assert hits.tolist() == [3, 1, 0, 0]
    assert total.tolist() == [4, 1, 1, 0]
    # class 3 has no images, so it has no recall: (0.75 + 1 + 0) / 3, not / 4
    assert balanced_accuracy(hits, total) == pytest.approx((0.75 + 1.0 + 0.0) / 3)


def test_balanced_accuracy_reads_a_confusion_matrix_the_same_way() -> None:
    matrix = np.array([[3, 1, 0], [0, 1, 0], [0, 1, 0]])
    got = balanced_accuracy(np.diag(matrix), matrix.sum(axis=1))
    assert got == pytest.approx((0.75 + 1.0 + 0.0) / 3)


def test_balanced_accuracy_of_no_images_is_zero() -> None:
    empty = torch.zeros(3, dtype=torch.long)
    assert balanced_accuracy(empty, empty) == 0.0
