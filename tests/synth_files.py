"""Small synthetic files in the real release formats: IDX .gz, .npz and a tar of PNG folders.

Every image carries its own id in its first two pixels (`image_ids` reads them back), so a test
can tell which images ended up in which split without trusting the code under test.
"""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IDX_NAMES = {  # torchvision's names for the KMNIST IDX release
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def labelled_images(first_id: int, n: int, size: int) -> np.ndarray:
    """n random uint8 images of size x size whose pixels (0, 0) and (0, 1) hold their id."""
    images = np.random.default_rng(first_id).integers(0, 256, (n, size, size), dtype=np.uint8)
    ids = np.arange(first_id, first_id + n)
    images[:, 0, 0], images[:, 0, 1] = ids // 256, ids % 256
    return images


def image_ids(images: torch.Tensor) -> list[int]:
    pixels = images[:, 0, :2].to(torch.int64)
    return (pixels[:, 0] * 256 + pixels[:, 1]).tolist()


def balanced_labels(n: int, num_classes: int) -> np.ndarray:
    return (np.arange(n) % num_classes).astype(np.uint8)


def write_idx_gz(path: Path, array: np.ndarray) -> None:
    """MNIST's IDX format, gzipped: 0x00 0x00 0x08 (uint8) ndim, big-endian dims, the bytes."""
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_kmnist_idx(raw_dir: Path, n_train: int, n_test: int) -> dict[str, np.ndarray]:
    """The four KMNIST IDX files with 10 balanced classes and ids 0..n_train+n_test-1, as
    {"train_x": images, "train_y": labels, "test_x": ..., "test_y": ...}."""
    arrays = {
        "train": (labelled_images(0, n_train, 28), balanced_labels(n_train, 10)),
        "test": (labelled_images(n_train, n_test, 28), balanced_labels(n_test, 10)),
    }
    for part, (images, labels) in arrays.items():
        write_idx_gz(raw_dir / IDX_NAMES[part][0], images)
        write_idx_gz(raw_dir / IDX_NAMES[part][1], labels)
    return {f"{part}_{xy}": a for part, (x, y) in arrays.items() for xy, a in (("x", x), ("y", y))}


def write_npz(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, arr_0=array)  # the release's layout: one array named arr_0


def write_release_npz(root: Path, name: str, n_train: int, n_test: int, num_classes: int) -> None:
    """<root>/<name>-{train,test}-{imgs,labels}.npz, as the KMNIST and K49 .npz releases."""
    for part, first, n in (("train", 0, n_train), ("test", n_train, n_test)):
        write_npz(root / f"{name}-{part}-imgs.npz", labelled_images(first, n, 28))
        write_npz(root / f"{name}-{part}-labels.npz", balanced_labels(n, num_classes))


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def write_kkanji_tar(path: Path, class_sizes: dict[int, int], size: int = 64) -> None:
    """kkanji.tar's layout: kkanji2/U+XXXX/<hash>.png, one folder per code point."""
    path.parent.mkdir(parents=True, exist_ok=True)
    next_id = 0
    with tarfile.open(path, "w") as tar:
        for codepoint, n in class_sizes.items():
            for image in labelled_images(next_id, n, size):
                data = png_bytes(image)
                member = tarfile.TarInfo(f"kkanji2/U+{codepoint:04X}/{next_id:016x}.png")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
                next_id += 1
