"""Splits: pure functions of (labels, fraction, seed)."""

from __future__ import annotations

from collections.abc import Sequence

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
    """(train, valid): valid is a seeded, stratified `fraction` of each class. Reuses the
    memory of `images` for train (see `split_in_place`): the caller hands `images` over."""
    kept, taken = stratified_split(labels, fraction, seed)
    train, valid = split_in_place(images, labels, [kept, taken])
    return train, valid


COMPACT_ROWS = 4096  # images moved per step of the in-place compaction


def split_in_place(
    images: np.ndarray, labels: np.ndarray, parts: Sequence[np.ndarray]
) -> list[Split]:
    """One Split per index array of `parts` (disjoint, each sorted ascending) with no second
    copy of the whole image array: the other parts are copied out first, then the first
    part's images are moved to the front of `images`, in place, and kept as a view of it.

    So a split costs the size of its other parts, not of all the images (K49's train file is
    182 MB; fancy-indexing train and valid out of it held 364 MB at once). `images` is
    overwritten: the caller must hand it over and not use it again. A read-only or
    non-contiguous array is copied once first.
    """
    if not (images.flags.writeable and images.flags.c_contiguous and images.dtype == np.uint8):
        images = np.array(images, dtype=np.uint8, order="C")
    first, *others = (np.asarray(p, dtype=np.int64) for p in parts)
    rest = [to_split(images, labels, index) for index in others]
    if first.size and np.any(np.diff(first) <= 0):
        raise ValueError("split_in_place: the first part's indices must be strictly ascending")
    # Ascending indices satisfy first[j] >= j, so row j is written only after every row it
    # could be read from at a later step has been read: chunks move safely front to back.
    for start in range(0, first.size, COMPACT_ROWS):
        chunk = first[start : start + COMPACT_ROWS]
        if chunk[0] != start or chunk[-1] != start + chunk.size - 1:  # rows already in place
            images[start : start + chunk.size] = images[chunk]
    kept = images[: first.size]  # a view: the tail's memory stays allocated, unused
    head = Split(torch.from_numpy(kept), torch.from_numpy(labels[first].astype(np.int64)))
    return [head, *rest]


def to_split(images: np.ndarray, labels: np.ndarray, index: np.ndarray | None = None) -> Split:
    if index is not None:
        images, labels = images[index], labels[index]
    images = np.ascontiguousarray(images, dtype=np.uint8)
    return Split(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)))


def join_splits(*splits: Split) -> Split:
    """One split of all their images, in order (the final fit trains on train + valid)."""
    return Split(torch.cat([s.images for s in splits]), torch.cat([s.labels for s in splits]))
