"""What every fuzz target shares: a scratch file in memory for the path its reader takes, and
a main that seeds an empty corpus, then hands libFuzzer's flags to atheris."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import atheris

SHM = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


def fuzz(
    argv: list[str],
    test_one_input: Callable[[bytes], None],
    seeds: Callable[[Path], list[bytes]],
    target: Path,
    name: str,
) -> None:
    """argv as libFuzzer takes it: flags start with '-', the first other word is the corpus
    folder (a temporary one if none); `seeds(corpus)` fills it when it is empty."""
    flags = [a for a in argv[1:] if a.startswith("-")]
    given = [a for a in argv[1:] if not a.startswith("-")]
    if not given:  # no corpus named: a temporary one
        given = [tempfile.mkdtemp(prefix=f"fuzz-{name}-corpus-")]
    corpus = Path(given[0])
    if corpus.is_dir() and not any(corpus.iterdir()):  # an empty corpus starts from the seeds
        for n, seed in enumerate(seeds(corpus)):
            (corpus / f"seed{n:02d}").write_bytes(seed)
    try:
        atheris.Setup([argv[0], *flags, *given], test_one_input)
        atheris.Fuzz()
    finally:
        target.unlink(missing_ok=True)
