"""Release files: where they live, their sizes and md5s; find, download and verify them."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from kmnist_sweep.errors import DataError, error_line
from kmnist_sweep.files import write_atomic

OFFICIAL_URL = "http://codh.rois.ac.jp/kmnist/dataset/"  # + "<dataset>/<file>"
IDX_FILES = {  # part -> (images, labels), torchvision's names for the KMNIST IDX release
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
KKANJI_TAR = "kkanji.tar"
# The official KMNIST test files, shipped inside the package (package-data) so that
# data=kmnist_sample runs offline from a fresh clone or an installed wheel.
SAMPLE_DIR = Path(__file__).resolve().parent / "sample"
OFFLINE_HINT = (
    "offline, data=kmnist_sample trains on the official KMNIST test images bundled with "
    "kmnist_sweep (split 80/20, not the official protocol)"
)


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
TIMEOUT_S = 30  # seconds without a byte before a download counts as failed
STAMP_FILE = ".verified.json"  # per folder: file -> [bytes, mtime_ns, md5] already checked


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
    hint: str = "",
) -> list[Path]:
    """Paths of `names` in `directory`, fetching missing ones from `url` (a folder URL) when
    `download`, and checking each against its known size and md5 when `verify`. `hint` ends
    the missing-files error (a way to go on without them)."""
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
            reason = f"download failed: {error_line(err, typed=False)}"
    if missing:
        sources = ", ".join(_join(url, path.name) for path in missing)
        raise DataError(
            f"missing {', '.join(p.name for p in missing)} in {directory} ({reason}); "
            f"download {sources} into that folder, or set data.root to where they are"
            + (f"; {hint}" if hint else "")
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
        raise _Unreachable(f"{url}: {error_line(err, typed=False)}") from err
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


def _join(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name
