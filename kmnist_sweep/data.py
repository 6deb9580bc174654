"""Datasets as uint8 tensors: find, download, verify, read and split them.

`load_dataset(cfg.data)` is the one call the rest of the package needs. It knows KMNIST
(IDX or .npz release), K49, Kuzushiji-Kanji (a tar of PNG folders with no official split),
kmnist_sample (the real KMNIST test files split 80/20, for offline runs) and a synthetic set
generated in memory for fast tests. Every problem with a user's files is a one-line
`DataError` naming the file and the problem; nothing half-downloaded, truncated or of the
wrong shape is ever trained on.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import io
import json
import logging
import math
import os
import re
import struct
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException
from PIL import Image
from tqdm import tqdm

from kmnist_sweep.errors import DataError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# The contract (docs/design.md)


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

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[-1])


# ---------------------------------------------------------------------------------------------
# Facts about the releases

# Index -> character, as in kmnist_classmap.csv: one character for each row of the hiragana
# table (U+304A U+304D U+3059 U+3064 U+306A U+306F U+307E U+3084 U+308C U+3092).
KMNIST_CLASSES = list("おきすつなはまやれを")
# k49_classmap.csv: 48 hiragana in gojuon order, with the obsolete ゐ ゑ at 44-45, を ん at
# 46-47, and the hiragana iteration mark ゝ (U+309D) at 48.
K49_CLASSES = list(
    "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわゐゑをんゝ"
)

OFFICIAL_URL = "http://codh.rois.ac.jp/kmnist/dataset/"  # + "<dataset>/<file>"
IDX_FILES = {  # part -> (images, labels), torchvision's names for the KMNIST IDX release
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
KKANJI_TAR = "kkanji.tar"
KKANJI_SIZE = 64  # pixels, each side of a Kuzushiji-Kanji PNG

# md5 of the release files. KMNIST's IDX sums are CODH's (torchvision lists the same). CODH
# publishes none for K49; these are the ones independent third-party K49 loaders ship. The
# KMNIST .npz files and kkanji.tar have no published sum: they are checked by shape only.
MD5 = {
    "train-images-idx3-ubyte.gz": "bdb82020997e1d708af4cf47b453dcf7",
    "train-labels-idx1-ubyte.gz": "e144d726b3acfaa3e44228e80efcd344",
    "t10k-images-idx3-ubyte.gz": "5c965bf0a639b31b8f53240b1b52f4d7",
    "t10k-labels-idx1-ubyte.gz": "7320c461ea6c1c855c0b718fb2a4b134",
    "k49-train-imgs.npz": "7ac088b20481cf51dcd01ceaab89d821",
    "k49-train-labels.npz": "44a8e1b893f81e63ff38d73cad420f7a",
    "k49-test-imgs.npz": "d352e201d846ce6b94f42c990966f374",
    "k49-test-labels.npz": "4da6f7a62e67a832d5eb1bd85c5ee448",
}
# Bytes of the IDX files (tensorflow_datasets' url_checksums): a cheap first check that names
# a truncated download as such before hashing.
BYTES = {
    "train-images-idx3-ubyte.gz": 18165135,
    "train-labels-idx1-ubyte.gz": 29497,
    "t10k-images-idx3-ubyte.gz": 3041136,
    "t10k-labels-idx1-ubyte.gz": 5120,
}
OFFICIAL_COUNTS = {  # images in the official parts, checked when data.verify is true
    "kmnist": {"train": 60000, "test": 10000},
    "k49": {"train": 232365, "test": 38547},
}
KMNIST_SAMPLE_COUNT = 10000  # the official KMNIST test set that kmnist_sample splits
TIMEOUT_S = 30  # seconds without a byte before a download counts as failed
STAMP_FILE = ".verified.json"  # per folder: file -> [bytes, mtime_ns, md5] already checked


# ---------------------------------------------------------------------------------------------
# Entry point


def load_dataset(cfg: DictConfig) -> Dataset:
    """Build the dataset that `cfg` (the `data:` group) names; raise DataError on bad input."""
    loaders: dict[str, Callable[[DictConfig], Dataset]] = {
        "kmnist": _load_release,
        "k49": _load_release,
        "kkanji": _load_kkanji,
        "kmnist_sample": _load_kmnist_sample,
        "synthetic": _load_synthetic,
    }
    name = str(cfg.get("name"))
    if name not in loaders:
        raise DataError(
            f"unknown dataset name {name!r} (data.name): use one of {', '.join(loaders)}"
        )
    try:
        dataset = loaders[name](cfg)
    except OmegaConfBaseException as err:  # a key missing from, or mistyped in, data:
        raise DataError(f"data config for {name}: {str(err).splitlines()[0]}") from err
    sizes = f"{len(dataset.train)} train / {len(dataset.valid)} valid / {len(dataset.test)} test"
    note = f" ({dataset.note})" if dataset.note else ""
    log.info(f"{name}: {sizes} images, {dataset.num_classes} classes{note}")
    return dataset


def _load_release(cfg: DictConfig) -> Dataset:
    """KMNIST or K49 with their official train/test parts; valid is carved from train."""
    name, verify = str(cfg.name), bool(cfg.verify)
    fmt = str(cfg.format) if name == "kmnist" else "npz"  # K49 ships only as .npz
    root = resolved_config(cfg.root)
    if fmt == "idx":
        directory = root / "KMNIST" / "raw"  # torchvision's layout: its downloads are reused
        names = {part: IDX_FILES[part] for part in ("train", "test")}
    elif fmt == "npz":
        directory = root
        names = {p: (f"{name}-{p}-imgs.npz", f"{name}-{p}-labels.npz") for p in ("train", "test")}
    else:
        raise DataError(f"unknown data.format {fmt!r} for {name}: use idx or npz")
    url = str(cfg.mirror or OFFICIAL_URL + name)
    files = [file for pair in names.values() for file in pair]
    ensure_files(directory, files, url, download=bool(cfg.download), verify=verify)

    read = read_idx if fmt == "idx" else read_npz
    classes = KMNIST_CLASSES if name == "kmnist" else K49_CLASSES
    parts = {}
    for part, (image_file, label_file) in names.items():
        images, labels = read(directory / image_file), read(directory / label_file)
        count = OFFICIAL_COUNTS[name][part] if verify else None
        parts[part] = check_arrays(images, labels, directory / image_file, len(classes), 28, count)
    train_images, train_labels = parts["train"]
    train, valid = carve_valid(
        train_images, train_labels, _fraction(cfg.valid_fraction, "valid_fraction"), int(cfg.seed)
    )
    test = to_split(*parts["test"])
    return Dataset(name, classes, train, valid, test, _metric(cfg), note="")


def _load_kmnist_sample(cfg: DictConfig) -> Dataset:
    """The real KMNIST test files, split stratified into train+valid and a held-out test part.

    The held-out part depends only on `split_seed`, so every run and trial is tested on the
    same images; the valid part follows the run's `seed` like every other dataset's.
    """
    root = resolved_config(cfg.root)
    # Accept the plain folder (../shared/data/kmnist) or torchvision's <root>/KMNIST/raw.
    directory = next(
        (d for d in (root, root / "KMNIST" / "raw") if (d / IDX_FILES["test"][0]).is_file()), root
    )
    verify = bool(cfg.verify)
    image_file, label_file = IDX_FILES["test"]
    url = OFFICIAL_URL + "kmnist"
    paths = ensure_files(
        directory, [image_file, label_file], url, False, False, "it never downloads"
    )
    for path in paths if verify else []:
        # Write no stamp: this folder is often shared and read-only, and hashing 3 MB is quick.
        verify_file(path, remember=False)
    count = KMNIST_SAMPLE_COUNT if verify else None
    images, labels = check_arrays(
        read_idx(directory / image_file),
        read_idx(directory / label_file),
        directory / image_file,
        len(KMNIST_CLASSES),
        28,
        count,
    )
    test_fraction = _fraction(cfg.test_fraction, "test_fraction")
    rest, held_out = stratified_split(labels, test_fraction, int(cfg.split_seed))
    train, valid = carve_valid(
        images[rest], labels[rest], _fraction(cfg.valid_fraction, "valid_fraction"), int(cfg.seed)
    )
    test_pct = round(100 * len(held_out) / len(labels))
    note = (
        f"kmnist_sample: {len(labels) / 1000:g}k official KMNIST test images split "
        f"{100 - test_pct}/{test_pct} — not the official benchmark protocol "
        "(train 60k / test 10k)"
    )
    test = to_split(images, labels, held_out)
    return Dataset("kmnist_sample", KMNIST_CLASSES, train, valid, test, _metric(cfg), note)


def _load_kkanji(cfg: DictConfig) -> Dataset:
    """Kuzushiji-Kanji: one folder of 64x64 PNGs per character and no official split.

    Split rule, per class of n images (see `take_count`): test takes round(test_fraction * n)
    but at least one, then valid takes round(valid_fraction * rest) but at least one, each
    always leaving one image for train. So a class with 1 image is train-only, 2 images give
    1 train + 1 test, 3 give 1 train + 1 valid + 1 test. The test part depends only on
    `split_seed`; valid follows the run's `seed`.
    """
    root = resolved_config(cfg.root)
    url = str(cfg.mirror or OFFICIAL_URL + "kkanji")
    # No checksum is published for kkanji.tar; decoding checks every image instead.
    [tar_path] = ensure_files(root, [KKANJI_TAR], url, bool(cfg.download), verify=False)
    images, labels, codepoints = read_kkanji(tar_path)
    classes = [chr(cp) for cp in codepoints]

    test_fraction = _fraction(cfg.test_fraction, "test_fraction")
    split_seed = int(cfg.split_seed)
    rest, held_out = stratified_split(labels, test_fraction, split_seed)
    valid_fraction = _fraction(cfg.valid_fraction, "valid_fraction")
    kept, taken = stratified_split(labels[rest], valid_fraction, int(cfg.seed))
    parts = {"train": rest[kept], "valid": rest[taken], "test": held_out}

    counts_path = root / f"kkanji_split_seed{split_seed}.csv"
    counts = {
        part: np.bincount(labels[idx], minlength=len(classes)) for part, idx in parts.items()
    }
    try:
        _write_split_counts(counts_path, codepoints, counts)
        log.info("kkanji: per-class train/valid/test counts written to %s", counts_path)
    except OSError as err:
        log.warning("kkanji: could not write the split counts (%s)", _one_line(err))
    note = (
        f"kkanji: no official split; seeded stratified split (test {test_fraction:g}, "
        f"valid {valid_fraction:g} of each class, split_seed {split_seed}); "
        "classes with one image are train-only"
    )
    train, valid, test = (to_split(images, labels, parts[p]) for p in ("train", "valid", "test"))
    return Dataset("kkanji", classes, train, valid, test, _metric(cfg), note)


def _load_synthetic(cfg: DictConfig) -> Dataset:
    """Class patterns plus noise, made in memory in milliseconds, for fast tests.

    Each class is a random 7x7 on/off grid scaled to the image; an image is its class's grid
    at a random brightness plus Gaussian pixel noise. Nearest class mean already scores over
    90%; a 1-channel ResNet-18 fits it within two epochs (with BatchNorm's running statistics
    still catching up after so few steps).
    """
    num_classes, size = int(cfg.num_classes), int(cfg.image_size)
    n_train, n_test = int(cfg.n_train), int(cfg.n_test)
    if num_classes < 2 or size < 7 or n_train < num_classes or n_test < 1:
        raise DataError(
            f"synthetic data needs num_classes >= 2, image_size >= 7, n_train >= num_classes "
            f"and n_test >= 1 (got {num_classes}, {size}, {n_train}, {n_test})"
        )
    rng = np.random.default_rng(int(cfg.seed))
    cells = np.arange(size) * 7 // size  # pixel -> grid cell, any image size
    grids = rng.random((num_classes, 7, 7)) < 0.5
    prototypes = grids[:, cells][:, :, cells].astype(np.float32) * 255

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.permutation(np.arange(n) % num_classes)  # balanced
        brightness = rng.uniform(0.7, 1.0, size=(n, 1, 1)).astype(np.float32)
        noise = rng.normal(0.0, 40.0, size=(n, size, size)).astype(np.float32)
        images = np.clip(prototypes[labels] * brightness + noise, 0, 255).astype(np.uint8)
        return images, labels.astype(np.int64)

    train_images, train_labels = draw(n_train)
    test_images, test_labels = draw(n_test)
    train, valid = carve_valid(
        train_images, train_labels, _fraction(cfg.valid_fraction, "valid_fraction"), int(cfg.seed)
    )
    note = "synthetic: random class patterns plus noise, not characters"
    classes = [str(c) for c in range(num_classes)]
    test = to_split(test_images, test_labels)
    return Dataset("synthetic", classes, train, valid, test, _metric(cfg), note)


def _metric(cfg: DictConfig) -> str:
    metric = str(cfg.metric)
    if metric not in ("acc", "bacc"):
        raise DataError(f"data.metric is {metric!r}: use acc or bacc")
    return metric


def _fraction(value: Any, key: str) -> float:
    try:
        fraction = float(value)
    except (TypeError, ValueError):
        fraction = math.nan
    if not 0 <= fraction < 1:  # NaN fails too
        raise DataError(f"data.{key} is {value!r}: use a fraction in [0, 1)")
    return fraction


def resolved_config(root: object) -> Path:
    """A relative data.root is taken from the current working directory (Hydra keeps it)."""
    return Path.cwd() / Path(str(root)).expanduser()


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


# ---------------------------------------------------------------------------------------------
# Reading the formats


def read_idx(path: Path) -> np.ndarray:
    """A gzipped IDX file (MNIST's format): 0x00 0x00 0x08 ndim, big-endian dims, uint8 data."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(
            f"{path}: cannot be decompressed ({_one_line(err)}); it is truncated or corrupt, "
            "delete it and download it again"
        ) from err
    ndim = raw[3] if len(raw) >= 4 else 0
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:3] != b"\x00\x00\x08" or ndim == 0:
        raise DataError(f"{path}: not an IDX file of uint8 data (bad header)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = math.prod(dims)
    if len(raw) - header != expected:
        shape = "x".join(map(str, dims))
        raise DataError(
            f"{path}: holds {len(raw) - header} data bytes but its header says {shape} "
            f"= {expected}; it is truncated or corrupt"
        )
    return np.frombuffer(raw, np.uint8, count=expected, offset=header).reshape(dims).copy()


def read_npz(path: Path) -> np.ndarray:
    """The release's .npz files each hold one array, `arr_0`."""
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: not an .npz archive")
        with archive:
            if "arr_0" not in archive.files:
                raise DataError(f"{path}: has no arr_0 array (holds {', '.join(archive.files)})")
            return np.asarray(archive["arr_0"])
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise DataError(
            f"{path}: not a readable .npz archive ({_one_line(err)}); it is truncated or "
            "corrupt, delete it and download it again"
        ) from err


def check_arrays(
    images: np.ndarray,
    labels: np.ndarray,
    path: Path,
    num_classes: int,
    size: int,
    count: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Refuse arrays that are not (N, size, size) uint8 images with N labels in range."""
    if images.ndim != 3 or images.shape[1:] != (size, size) or images.dtype != np.uint8:
        raise DataError(
            f"{path}: images have shape {tuple(images.shape)} and dtype {images.dtype}, "
            f"expected (N, {size}, {size}) uint8"
        )
    n = images.shape[0]
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{path}: {n} images but the labels have shape {tuple(labels.shape)} and dtype "
            f"{labels.dtype}, expected ({n},) integers"
        )
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels outside 0..{num_classes - 1}")
    if count is not None and n != count:
        raise DataError(f"{path}: holds {n} images, the official file has {count}")
    return images, labels.astype(np.int64)


KKANJI_MEMBER = re.compile(r"(?:^|/)U\+([0-9A-Fa-f]{4,6})/[^/]+\.png$")  # kkanji2/U+XXXX/h.png


def read_kkanji(tar_path: Path) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(images, labels, code point of each class), decoded once and cached beside the tar.

    Decoding 140k PNGs takes minutes; the uncompressed cache loads in about a second. It is
    rebuilt when the tar's size or mtime changes.
    """
    cache = tar_path.with_name(tar_path.stem + "_decoded.npz")
    stat = tar_path.stat()
    stamp = np.array([stat.st_size, stat.st_mtime_ns], dtype=np.int64)
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                if np.array_equal(z["stamp"], stamp):
                    return z["images"], z["labels"], z["codepoints"].tolist()
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as err:
            log.warning("kkanji: ignoring unreadable cache %s (%s)", cache, _one_line(err))
    images, labels, codepoints = decode_kkanji_tar(tar_path)
    codes = np.array(codepoints)
    try:
        write_atomic(
            cache,
            lambda f: np.savez(f, images=images, labels=labels, codepoints=codes, stamp=stamp),
        )
    except OSError as err:
        log.warning("kkanji: could not cache the decoded images (%s)", _one_line(err))
    return images, labels, codepoints


def decode_kkanji_tar(tar_path: Path) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Decode every kkanji2/U+XXXX/*.png; classes are the code points in ascending order."""
    try:
        with tarfile.open(tar_path) as tar:
            found = [(m, KKANJI_MEMBER.search(m.name)) for m in tar.getmembers() if m.isfile()]
            members = sorted(
                ((m, int(match[1], 16)) for m, match in found if match),
                key=lambda pair: pair[0].name,
            )
            if not members:
                raise DataError(
                    f"{tar_path}: holds no images (expected kkanji2/U+XXXX/<hash>.png members)"
                )
            codepoints = sorted({cp for _, cp in members})
            index = {cp: i for i, cp in enumerate(codepoints)}
            images = np.empty((len(members), KKANJI_SIZE, KKANJI_SIZE), dtype=np.uint8)
            labels = np.array([index[cp] for _, cp in members], dtype=np.int64)
            for i, (member, _) in enumerate(
                tqdm(members, desc=f"decoding {tar_path.name}", unit="img", disable=None)
            ):
                data = tar.extractfile(member)
                images[i] = _decode_png(data.read() if data else b"", f"{tar_path}:{member.name}")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise DataError(f"{tar_path}: not a readable tar file ({_one_line(err)})") from err
    return images, labels, codepoints


def _decode_png(data: bytes, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            pixels = np.asarray(image.convert("L"))
    except (OSError, ValueError) as err:
        raise DataError(f"{where}: not a readable PNG ({_one_line(err)})") from err
    if pixels.shape != (KKANJI_SIZE, KKANJI_SIZE):
        raise DataError(
            f"{where}: image is {pixels.shape[1]}x{pixels.shape[0]} px, "
            f"expected {KKANJI_SIZE}x{KKANJI_SIZE}"
        )
    return pixels


def _write_split_counts(path: Path, codepoints: list[int], counts: dict[str, np.ndarray]) -> None:
    rows = ["index,codepoint,char,train,valid,test"]
    for i, cp in enumerate(codepoints):
        train, valid, test = (counts[part][i] for part in ("train", "valid", "test"))
        rows.append(f"{i},U+{cp:04X},{chr(cp)},{train},{valid},{test}")
    text = "\n".join(rows) + "\n"
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


# ---------------------------------------------------------------------------------------------
# Files: find, download, verify


class _Unreachable(Exception):
    """A download that could not complete (network, server or local write problem)."""


def ensure_files(
    directory: Path,
    names: Sequence[str],
    url: str,
    download: bool,
    verify: bool,
    no_download_reason: str = "data.download is false",
) -> list[Path]:
    """Paths of `names` in `directory`, fetching missing ones from `url` (a folder URL) when
    `download`, and checking each against its known size and md5 when `verify`."""
    paths = [directory / name for name in names]
    missing = [path for path in paths if not path.is_file()]
    reason = no_download_reason
    if missing and download:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            while missing:
                fetch(
                    _join(url, missing[0].name),
                    missing[0],
                    MD5.get(missing[0].name) if verify else None,
                )
                missing.pop(0)
        except (_Unreachable, OSError) as err:
            reason = f"download failed: {_one_line(err)}"
    if missing:
        sources = ", ".join(_join(url, path.name) for path in missing)
        raise DataError(
            f"missing {', '.join(p.name for p in missing)} in {directory} ({reason}); "
            f"download {sources} into that folder, or set data.root to where they are"
        )
    if verify:
        for path in paths:
            verify_file(path)
    return paths


def fetch(url: str, dest: Path, md5: str | None) -> None:
    """Download `url` to `dest` through a `.part` file, renamed only once complete and matching
    `md5`, so an interrupted or corrupt download never takes `dest`'s name."""
    part = dest.with_name(f"{dest.name}.{os.getpid()}.part")  # per process: workers may race
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, part.open("wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length else None
            with tqdm(total=total, desc=dest.name, unit="B", unit_scale=True, disable=None) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
        received = part.stat().st_size
        if total is not None and received != total:
            raise _Unreachable(f"{url} ended after {received} of {total} bytes")
        actual = md5_of(part) if md5 else None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
        part.unlink(missing_ok=True)
        raise _Unreachable(f"{url}: {_one_line(err)}") from err
    except _Unreachable:
        part.unlink(missing_ok=True)
        raise
    if md5 and actual != md5:
        part.unlink(missing_ok=True)
        raise DataError(
            f"{dest.name} downloaded from {url} has md5 {actual}, expected {md5}: not saved "
            "(corrupt transfer, or the file changed at the source)"
        )
    part.replace(dest)
    if md5:
        _record_verified(dest, md5)


def verify_file(path: Path, remember: bool = True) -> None:
    """Check `path` against its official size and md5 where known. The md5 is computed once
    when `remember`: a stamp (bytes, mtime, md5) in the folder's .verified.json lets later
    loads skip it."""
    md5, size = MD5.get(path.name), BYTES.get(path.name)
    stat = path.stat()
    if size is not None and stat.st_size != size:
        raise DataError(
            f"{path}: {stat.st_size} bytes, the official file has {size} (truncated or the "
            "wrong file); delete it and download it again"
        )
    if md5 is None:
        return
    stamp = [stat.st_size, stat.st_mtime_ns, md5]
    if _read_stamps(path.parent).get(path.name) == stamp:
        return
    actual = md5_of(path)
    if actual != md5:
        raise DataError(
            f"{path}: md5 {actual} does not match the official {md5} (corrupt or modified); "
            "delete it and download it again"
        )
    if remember:
        _record_verified(path, md5)


def md5_of(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _read_stamps(directory: Path) -> dict[str, list[object]]:
    try:
        stamps = json.loads((directory / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return stamps if isinstance(stamps, dict) else {}


def _record_verified(path: Path, md5: str) -> None:
    stat = path.stat()
    stamps = _read_stamps(path.parent) | {path.name: [stat.st_size, stat.st_mtime_ns, md5]}
    text = json.dumps(stamps, indent=1, sort_keys=True)
    with contextlib.suppress(OSError):  # read-only folder (shared data): hash again next time
        write_atomic(path.parent / STAMP_FILE, lambda f: f.write(text.encode()))


def write_atomic(path: Path, write: Callable[[io.BufferedWriter], object]) -> None:
    """Write through a per-process .part file, then rename: readers (other workers too) see
    the old file or the whole new one, never a partial one."""
    part = path.with_name(f"{path.name}.{os.getpid()}.part")
    try:
        with part.open("wb") as f:
            write(f)
        part.replace(path)
    finally:
        part.unlink(missing_ok=True)


def _join(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


def _one_line(err: BaseException | str) -> str:
    return " ".join(str(err).split()) or type(err).__name__
