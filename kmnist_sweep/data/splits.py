"""Splits: pure functions of (labels, fraction, seed)."""

from __future__ import annotations

import numpy as np
import torch

from kmnist_sweep.data.contract import Split

# ---------------------------------------------------------------------------------------------
# Splits: pure functions of (labels, fraction, seed)


def take_count(sizes: np.ndarray, fraction: float) -> np.ndarray:
    """Images to take from classes of `sizes` images: round(fraction * n), at least one, but
    always leaving one behind; a class with a single image gives none."""
    if fraction <= 0:
        return np.zeros_like(sizes)
    wanted = np.maximum(np.floor(sizes * fraction + 0.5).astype(sizes.dtype), 1)
    return np.where(sizes >= 2, np.minimum(wanted, sizes - 1), 0)


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices (kept, taken): `take_count` images taken at random from each class."""
    perm = np.random.default_rng(seed).permutation(len(labels))
    perm = perm[np.argsort(labels[perm], kind="stable")]  # grouped by class, random within
    _, starts, sizes = np.unique(labels[perm], return_index=True, return_counts=True)
    rank = np.arange(len(perm)) - np.repeat(starts, sizes)  # position within its class
    taken = rank < np.repeat(take_count(sizes, fraction), sizes)
    return np.sort(perm[~taken]), np.sort(perm[taken])


def carve_valid(
    images: np.ndarray, labels: np.ndarray, fraction: float, seed: int
) -> tuple[Split, Split]:
    """(train, valid): valid is a seeded, stratified `fraction` of each class."""
    kept, taken = stratified_split(labels, fraction, seed)
    return to_split(images, labels, kept), to_split(images, labels, taken)


def to_split(images: np.ndarray, labels: np.ndarray, index: np.ndarray | None = None) -> Split:
    if index is not None:
        images, labels = images[index], labels[index]
    images = np.ascontiguousarray(images, dtype=np.uint8)
    return Split(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)))


def join_splits(*splits: Split) -> Split:
    """One split of all their images, in order (the final fit trains on train + valid)."""
    return Split(torch.cat([s.images for s in splits]), torch.cat([s.labels for s in splits]))
