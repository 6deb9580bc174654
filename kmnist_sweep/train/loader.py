"""The data side of training: the whole split on the device, batches cut from a
device-side permutation.

The datasets are small (KMNIST is 47 MB as uint8), so a DataLoader with workers only
adds copies. A `DeviceLoader` keeps the uint8 images on the training device, draws a
seeded permutation per epoch, and normalises and augments a whole batch at once. It
quacks like a fastai DataLoader, so fastai's Learner, Recorder, `fit_one_cycle` and
`lr_find` run on it unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from fastai.data.core import DataLoaders
from omegaconf import DictConfig
from torch import nn

from kmnist_sweep.data.contract import Dataset, Split
from kmnist_sweep.errors import DataError


def use_channels_last(setting: Any, device: torch.device) -> bool:
    # `auto` is on everywhere: channels-last is oneDNN's preferred layout on CPUs and what
    # CUDA's tensor cores want (docs/benchmarks.md). Set false to compare.
    return True if setting == "auto" else bool(setting)


# ---------------------------------------------------------------- the loader


@dataclass(frozen=True)
class Augment:
    translate: int = 0  # pixels: largest random shift per axis
    cutout: int = 0  # pixels: side of a square set to the mean grey (0 = off)


def shift_batch(x: torch.Tensor, pixels: int, gen: torch.Generator) -> torch.Tensor:
    """Each (B, 1, H, W) image moved by up to `pixels` per axis, zero fill; never flips,
    which would mirror characters into other or non-existent ones."""
    b, _, h, w = x.shape
    dev = x.device
    padded = nn.functional.pad(x, (pixels, pixels, pixels, pixels))
    dy = torch.randint(0, 2 * pixels + 1, (b, 1), generator=gen, device=dev)
    dx = torch.randint(0, 2 * pixels + 1, (b, 1), generator=gen, device=dev)
    rows = (torch.arange(h, device=dev) + dy)[:, :, None]
    cols = (torch.arange(w, device=dev) + dx)[:, None, :]
    batch = torch.arange(b, device=dev)[:, None, None]
    return padded[:, 0][batch, rows, cols].unsqueeze(1)


def cutout_batch(x: torch.Tensor, side: int, gen: torch.Generator) -> torch.Tensor:
    """A random `side` x `side` square of each (B, 1, H, W) image set to 0."""
    b, _, h, w = x.shape
    dev = x.device
    cy = torch.randint(0, h, (b, 1, 1, 1), generator=gen, device=dev)
    cx = torch.randint(0, w, (b, 1, 1, 1), generator=gen, device=dev)
    ys = torch.arange(h, device=dev)[None, None, :, None]
    xs = torch.arange(w, device=dev)[None, None, None, :]
    dy, dx = ys - cy + side // 2, xs - cx + side // 2
    hole = (dy >= 0) & (dy < side) & (dx >= 0) & (dx < side)
    return x.masked_fill(hole, 0)


def augment_batch(
    images: torch.Tensor, aug: Augment, gen: torch.Generator, mean: float, std: float
) -> torch.Tensor:
    """uint8 (B, H, W) -> the standardised float (B, 1, H, W) a model trains on.
    Shifts act on the raw scan, so the rows they bring in are its black background, as in
    any test image; cutout acts after standardising, so its hole is the mean grey (0), an
    occluder rather than erased ink."""
    if aug.translate > 0:
        images = shift_batch(images.unsqueeze(1), aug.translate, gen).squeeze(1)
    x = to_input(images, mean, std)
    if aug.cutout > 0:
        x = cutout_batch(x, aug.cutout, gen)
    return x


def to_input(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 (B, H, W) -> the float (B, 1, H, W) a model takes, standardised by the training
    split's pixel mean and std (fractions of 255). Training and predict share it."""
    return images.unsqueeze(1).float().sub_(mean * 255).div_(std * 255)


STATS_CHUNK = 1024  # images per histogram step: bounds any temporary of the count (4 M px)


def pixel_stats(images: torch.Tensor) -> tuple[float, float]:
    """Mean and (unbiased) std of every pixel of uint8 `images`, as fractions of 255.

    Exact, from a 256-bin histogram counted a chunk at a time, so no float copy of the split
    is ever made: as float32, K49's training split is 0.7 GB and Kuzushiji-Kanji's 1.8 GB,
    each built again per trial, halving and range test.
    """
    counts = torch.zeros(256, dtype=torch.float64)
    for chunk in images.split(STATS_CHUNK):
        counts += torch.bincount(chunk.reshape(-1), minlength=256).to(torch.float64)
    n = float(counts.sum())
    if n < 2:
        raise DataError(f"the training split has {int(n)} pixels: too few to standardise by")
    values = torch.arange(256, dtype=torch.float64) / 255
    mean = float((counts * values).sum() / n)
    var = float((counts * (values - mean) ** 2).sum() / (n - 1))
    return mean, var**0.5


class DeviceLoader:
    """Batches of (normalised float images, labels) from uint8 tensors held on `device`."""

    def __init__(
        self,
        split: Split,
        batch_size: int,
        device: torch.device,
        *,
        shuffle: bool,
        seed: int,
        mean: float,
        std: float,
        augment: Augment | None = None,
        channels_last: bool = False,
    ) -> None:
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.bs = batch_size
        self.device = device
        self.shuffle = shuffle
        self.mean, self.std = mean, std
        self.augment = augment
        self.channels_last = channels_last
        self.seed = seed
        self.epoch = 0  # advances each pass so every epoch has its own permutation
        self.gen = torch.Generator(device=device)

    @property
    def n(self) -> int:
        return len(self.labels)

    def __len__(self) -> int:
        return math.ceil(self.n / self.bs)

    def order(self) -> torch.Tensor:
        """This epoch's sample order: a permutation seeded by (seed, epoch), or 0..n-1."""
        if not self.shuffle:
            return torch.arange(self.n, device=self.device)
        self.gen.manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=self.gen, device=self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self.order()
        self.epoch += 1
        # Near-equal batches of at most `bs`: every image once per epoch, and no ragged
        # one-image batch for BatchNorm to choke on.
        for sel in torch.tensor_split(idx, len(self)):
            yield self.batch(sel)

    def batch(self, sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.augment is not None:
            x = augment_batch(self.images[sel], self.augment, self.gen, self.mean, self.std)
        else:
            x = to_input(self.images[sel], self.mean, self.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, self.labels[sel]

    # What fastai's Learner asks of a DataLoader beyond iteration.
    def to(self, device: torch.device) -> DeviceLoader:
        return self if torch.device(device) == self.device else self.new(device=device)

    def new(self, **kwargs: Any) -> DeviceLoader:
        """A copy over the same tensors (fastai calls this for predictions)."""
        copy = DeviceLoader.__new__(DeviceLoader)
        copy.__dict__.update(self.__dict__)
        copy.gen = torch.Generator(device=self.device)
        if "shuffle" in kwargs:
            copy.shuffle = bool(kwargs["shuffle"])
        return copy


EVAL_PIXELS = 256 * 28 * 28  # pixels per evaluation step for `eval_batch_size: auto`


def eval_batch_size(setting: Any, image_shape: Sequence[int]) -> int:
    """Images per evaluation step: the setting, or for `auto` the largest power of two whose
    batch holds at most 256 28x28 images' pixels (256 for KMNIST and K49, 32 for 64x64
    Kanji). A step's activations grow with its pixels and a worker pays them on top of its
    data (benchmarks/memory.py; docs/benchmarks.md)."""
    if setting != "auto":
        return int(setting)
    pixels = max(1, math.prod(int(side) for side in image_shape))
    return 1 << max(0, (EVAL_PIXELS // pixels).bit_length() - 1)


def make_loaders(
    dataset: Dataset, cfg: DictConfig, batch_size: int, device: torch.device, seed: int
) -> DataLoaders:
    """fastai DataLoaders (train, valid, test) over device-resident tensors."""
    mean, std = pixel_stats(dataset.train.images)  # of the training split only
    channels_last = use_channels_last(cfg.channels_last, device)
    common: dict[str, Any] = dict(device=device, seed=seed, mean=mean, std=std)
    common["channels_last"] = channels_last
    aug = Augment(translate=int(cfg.translate), cutout=int(cfg.cutout))
    train = DeviceLoader(dataset.train, batch_size, shuffle=True, augment=aug, **common)
    eval_bs = eval_batch_size(cfg.eval_batch_size, dataset.train.images.shape[1:])
    valid = DeviceLoader(dataset.valid, eval_bs, shuffle=False, **common)
    test = DeviceLoader(dataset.test, eval_bs, shuffle=False, **common)
    return DataLoaders(train, valid, test, device=device)
