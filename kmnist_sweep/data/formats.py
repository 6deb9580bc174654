"""Reading the release formats: gzipped IDX, .npz, and the Kuzushiji-Kanji tar of PNGs."""

from __future__ import annotations

import gzip
import io
import logging
import math
import re
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from kmnist_sweep.errors import DataError, error_line
from kmnist_sweep.files import write_atomic

log = logging.getLogger(__name__)

KKANJI_SIZE = 64  # pixels, each side of a Kuzushiji-Kanji PNG
# ---------------------------------------------------------------------------------------------
# Reading the formats


def read_idx(path: Path) -> np.ndarray:
    """A gzipped IDX file (MNIST's format): 0x00 0x00 0x08 ndim, big-endian dims, uint8 data."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(
            f"{path}: cannot be decompressed ({error_line(err, typed=False)}); it is truncated "
            "or corrupt, delete it and download it again"
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
            f"{path}: not a readable .npz archive ({error_line(err, typed=False)}); it is "
            "truncated or corrupt, delete it and download it again"
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
            log.warning(
                "kkanji: ignoring unreadable cache %s (%s)", cache, error_line(err, typed=False)
            )
    images, labels, codepoints = decode_kkanji_tar(tar_path)
    codes = np.array(codepoints)
    try:
        write_atomic(
            cache,
            lambda f: np.savez(f, images=images, labels=labels, codepoints=codes, stamp=stamp),
        )
    except OSError as err:
        log.warning(
            "kkanji: could not cache the decoded images (%s)", error_line(err, typed=False)
        )
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
        raise DataError(
            f"{tar_path}: not a readable tar file ({error_line(err, typed=False)})"
        ) from err
    return images, labels, codepoints


def _decode_png(data: bytes, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            pixels = np.asarray(image.convert("L"))
    except (OSError, ValueError) as err:
        raise DataError(f"{where}: not a readable PNG ({error_line(err, typed=False)})") from err
    if pixels.shape != (KKANJI_SIZE, KKANJI_SIZE):
        raise DataError(
            f"{where}: image is {pixels.shape[1]}x{pixels.shape[0]} px, "
            f"expected {KKANJI_SIZE}x{KKANJI_SIZE}"
        )
    return pixels


def write_split_counts(path: Path, codepoints: list[int], counts: dict[str, np.ndarray]) -> None:
    rows = ["index,codepoint,char,train,valid,test"]
    for i, cp in enumerate(codepoints):
        train, valid, test = (counts[part][i] for part in ("train", "valid", "test"))
        rows.append(f"{i},U+{cp:04X},{chr(cp)},{train},{valid},{test}")
    text = "\n".join(rows) + "\n"
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))
