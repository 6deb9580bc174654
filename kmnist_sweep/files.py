"""Files we write: atomically (readers see the old file or the whole new one), and folders
checked for writability before any work starts.

    write_atomic(path, "text")            # str, bytes, or a function writing to a binary file
    check_writable_dir(path, "study.output_dir='x' cannot be created")
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from kmnist_sweep.errors import ConfigError


def write_atomic(path: Path, content: str | bytes | Callable[[BinaryIO], object]) -> None:
    """Write through a per-process `.part` file in the same folder, then rename: readers,
    other workers included, never see half a file. The folder is created if missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        with part.open("wb") as f:
            if isinstance(content, str):
                f.write(content.encode("utf-8"))
            elif isinstance(content, bytes):
                f.write(content)
            else:
                content(f)
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)


def check_writable_dir(path: Path, what: str) -> None:
    """A ConfigError "<what>: <why>" now, not an OSError once the study runs, when the folder
    `path` (made later if missing) cannot be created or written. Leaves nothing behind."""
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{what}: {existing} is not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-test-", dir=existing))
    except OSError as exc:
        raise ConfigError(
            f"{what}: {existing} takes no new folders ({exc.strerror or type(exc).__name__})"
        ) from None
