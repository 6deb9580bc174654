"""Datasets as uint8 tensors: the one entry point, `load_dataset(cfg.data)`.

`load_dataset(cfg.data)` is the one call the rest of the package needs. It knows KMNIST
(IDX or .npz release), K49, Kuzushiji-Kanji (a tar of PNG folders with no official split),
kmnist_sample (the real KMNIST test files split 80/20, for offline runs) and a synthetic set
generated in memory for fast tests. Every problem with a user's files is a one-line
`DataError` naming the file and the problem; nothing half-downloaded, truncated or of the
wrong shape is ever trained on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from kmnist_sweep.data.contract import Dataset, Split
from kmnist_sweep.data.download import (
    IDX_FILES,
    KKANJI_TAR,
    OFFICIAL_URL,
    OFFLINE_HINT,
    SAMPLE_DIR,
    ensure_files,
    verify_file,
)
from kmnist_sweep.data.formats import (
    check_arrays,
    read_idx,
    read_kkanji,
    read_npz,
    write_split_counts,
)
from kmnist_sweep.data.splits import carve_valid, split_in_place, stratified_split, to_split
from kmnist_sweep.errors import DataError, error_line

__all__ = ["Dataset", "Split", "load_dataset"]

log = logging.getLogger(__name__)


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

OFFICIAL_COUNTS = {  # images in the official parts, checked when data.verify is true
    "kmnist": {"train": 60000, "test": 10000},
    "k49": {"train": 232365, "test": 38547},
}
KMNIST_SAMPLE_COUNT = 10000  # the official KMNIST test set that kmnist_sample splits


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
    hint = OFFLINE_HINT if name == "kmnist" else ""
    paths = ensure_files(directory, files, url, bool(cfg.download), verify, hint=hint)

    read = read_idx if fmt == "idx" else read_npz
    classes = KMNIST_CLASSES if name == "kmnist" else K49_CLASSES
    parts = {}
    for part, (image_file, label_file) in names.items():
        images, labels = read(directory / image_file), read(directory / label_file)
        count = OFFICIAL_COUNTS[name][part] if verify else None
        parts[part] = check_arrays(images, labels, directory / image_file, len(classes), 28, count)
    train_images, train_labels = parts["train"]
    train, valid = carve_valid(
        train_images, train_labels, float(cfg.valid_fraction), int(cfg.seed)
    )
    test = to_split(*parts["test"])
    return Dataset(name, classes, train, valid, test, str(cfg.metric), "", tuple(paths))


def _load_kmnist_sample(cfg: DictConfig) -> Dataset:
    """The real KMNIST test files, split stratified into train+valid and a held-out test part.

    The held-out part depends only on `split_seed`, so every run and trial is tested on the
    same images; the valid part follows the run's `seed` like every other dataset's.
    """
    # null: the copy inside the package, found from any working folder and after an install.
    root = SAMPLE_DIR if cfg.root is None else resolved_config(cfg.root)
    # Accept the plain folder (the bundled copy) or torchvision's <root>/KMNIST/raw.
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
    test_fraction = float(cfg.test_fraction)
    rest, held_out = stratified_split(labels, test_fraction, int(cfg.split_seed))
    train, valid = carve_valid(
        images[rest], labels[rest], float(cfg.valid_fraction), int(cfg.seed)
    )
    test_pct = round(100 * len(held_out) / len(labels))
    note = (
        f"kmnist_sample: {len(labels) / 1000:g}k official KMNIST test images split "
        f"{100 - test_pct}/{test_pct} — not the official benchmark protocol "
        "(train 60k / test 10k)"
    )
    test = to_split(images, labels, held_out)
    metric = str(cfg.metric)
    return Dataset("kmnist_sample", KMNIST_CLASSES, train, valid, test, metric, note, tuple(paths))


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

    test_fraction = float(cfg.test_fraction)
    split_seed = int(cfg.split_seed)
    rest, held_out = stratified_split(labels, test_fraction, split_seed)
    valid_fraction = float(cfg.valid_fraction)
    kept, taken = stratified_split(labels[rest], valid_fraction, int(cfg.seed))
    parts = {"train": rest[kept], "valid": rest[taken], "test": held_out}

    counts_path = root / f"kkanji_split_seed{split_seed}.csv"
    counts = {
        part: np.bincount(labels[idx], minlength=len(classes)) for part, idx in parts.items()
    }
    try:
        write_split_counts(counts_path, codepoints, counts)
        log.info("kkanji: per-class train/valid/test counts written to %s", counts_path)
    except OSError as err:
        log.warning("kkanji: could not write the split counts (%s)", error_line(err, typed=False))
    note = (
        f"kkanji: no official split; seeded stratified split (test {test_fraction:g}, "
        f"valid {valid_fraction:g} of each class, split_seed {split_seed}); "
        "classes with one image are train-only"
    )
    # Train stays in the decoded array's memory; valid and test are copied out of it.
    train, valid, test = split_in_place(
        images, labels, [parts[p] for p in ("train", "valid", "test")]
    )
    return Dataset("kkanji", classes, train, valid, test, str(cfg.metric), note, (tar_path,))


def _load_synthetic(cfg: DictConfig) -> Dataset:
    """Class patterns plus noise, made in memory in milliseconds, for fast tests.

    Each class is a random 7x7 on/off grid scaled to the image; an image is its class's grid
    at a random brightness plus Gaussian pixel noise. Nearest class mean already scores over
    90%; a 1-channel ResNet-18 fits it within two epochs (with BatchNorm's running statistics
    still catching up after so few steps).
    """
    num_classes, size = int(cfg.num_classes), int(cfg.image_size)
    n_train, n_test = int(cfg.n_train), int(cfg.n_test)
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
        train_images, train_labels, float(cfg.valid_fraction), int(cfg.seed)
    )
    note = "synthetic: random class patterns plus noise, not characters"
    classes = [str(c) for c in range(num_classes)]
    test = to_split(test_images, test_labels)
    return Dataset("synthetic", classes, train, valid, test, str(cfg.metric), note)


def resolved_config(root: object) -> Path:
    """A relative data.root is taken from the current working directory (Hydra keeps it)."""
    return Path.cwd() / Path(str(root)).expanduser()
