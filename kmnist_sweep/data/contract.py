"""The data contract every layer above relies on (docs/design.md): uint8 images on the CPU."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Split:
    """One part of a dataset, on the CPU; the engine moves it to the device once."""

    images: torch.Tensor  # uint8, (N, H, W)
    labels: torch.Tensor  # int64, (N,)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class Dataset:
    name: str  # cfg.data.name
    classes: list[str]  # index -> character
    train: Split
    valid: Split  # carved from train (seeded, stratified); sweeps score on it
    test: Split  # official test set, or the held-out part for kmnist_sample / kkanji
    metric: str  # "acc" or "bacc" (balanced accuracy: mean recall over classes)
    note: str  # printed next to every accuracy ("" for official protocols)
    files: tuple[Path, ...] = ()  # the files read (a model bundle records their md5s)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[-1])
