"""Fuzz the model-bundle loader `predict` runs first (read_bundle, then load_model): nothing
but a one-line UserError may come out of it, whatever the bytes.

    python -m tests.fuzz.fuzz_bundle_loader -atheris_runs=1000000      # libFuzzer flags

An input is either a whole file (first byte `Z`: the rest is the .zip as it is on disk) or
the two entries of a bundle (first byte `P`, then the length of bundle.json as 4 bytes,
bundle.json, weights.pt), zipped here so that mutations reach past the zip's checksums to
the JSON fields and the weights. Starts from a real bundle as `final` writes it.
"""

from __future__ import annotations

import io
import os
import sys
import zipfile

import atheris
import torch

with atheris.instrument_imports(include=["kmnist_sweep"]):
    from kmnist_sweep.errors import UserError
    from kmnist_sweep.results.bundle import BUNDLE_JSON, WEIGHTS, load_model, read_bundle

from tests.fuzz.harness import SHM, fuzz
from tests.fuzz.seeds import bundle_seeds

TARGET = SHM / f"fuzz-bundle-{os.getpid()}.zip"  # read_bundle reads a path, as predict does


def as_file(data: bytes) -> bytes:
    if data[:1] != b"P":
        return data[1:]
    size = int.from_bytes(data[1:5], "big")
    meta, weights = data[5 : 5 + size], data[5 + size :]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(BUNDLE_JSON, meta)
        zf.writestr(WEIGHTS, weights)
    return buf.getvalue()


def test_one_input(data: bytes) -> None:
    TARGET.write_bytes(as_file(data))
    try:
        bundle = read_bundle(TARGET)
        load_model(bundle, TARGET, torch.device("cpu"))
    except UserError as exc:
        assert "\n" not in str(exc), repr(str(exc))


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    fuzz(
        argv,
        test_one_input,
        lambda corpus: bundle_seeds(corpus.parent / f"{corpus.name}-work"),
        TARGET,
        "bundle",
    )


if __name__ == "__main__":
    main(sys.argv)
