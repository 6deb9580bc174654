"""A short run of each fuzz target (tests/fuzz/), as CI's guard that the image reader and the
bundle loader still raise nothing but one-line errors on the inputs the fuzzer makes from
real files. The long runs (a million inputs) are by hand: docs/predict.md."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CLI_ENV, REPO

pytestmark = [pytest.mark.fuzz, pytest.mark.slow]  # seconds of CPU for each target
pytest.importorskip("atheris")

# Inputs per target: a few seconds each on two cores; a fixed seed, so a run is repeatable.
RUNS = {"fuzz_image_reader": 2000, "fuzz_bundle_loader": 300}


@pytest.mark.parametrize("target", sorted(RUNS))
def test_fuzz_target_raises_only_one_line_errors(target: str, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            f"tests.fuzz.{target}",
            str(corpus),
            f"-atheris_runs={RUNS[target]}",
            "-seed=1",
            f"-artifact_prefix={tmp_path}/",
        ],
        cwd=REPO,
        env={**CLI_ENV, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert f"Done {RUNS[target]} in" in out.stderr
