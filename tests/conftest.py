"""Shared fixtures: composed configs and paths."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import kmnist_sweep  # noqa: F401  (torchvision compat first)

REPO = Path(__file__).resolve().parents[1]
SHARED_KMNIST = REPO.parent / "shared" / "data" / "kmnist"
CLI_ENV = {
    **os.environ,
    "WANDB_MODE": "disabled",
    "PYTHONUNBUFFERED": "1",
    # The checkout under test, whatever the environment's editable install points at, and
    # `tests.*` importable for the toy objectives.
    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
}


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    """`python -m kmnist_sweep ...` as a user runs it, in `cwd`; `env` adds to CLI_ENV."""
    return subprocess.run(
        [sys.executable, "-m", "kmnist_sweep", *args],
        cwd=cwd,
        env={**CLI_ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def compose_cfg() -> Callable[..., DictConfig]:
    """compose_cfg("data=synthetic", "+sweep=lr") -> the composed config."""

    def _compose(*overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))

    return _compose


# The longest files, longest first (`pytest --durations` in CI shows their times). They go to
# the two processes first (.ci/run keeps this order with --no-loadscope-reorder): a long file
# started last would run alone at the end while the other process idles.
LONGEST_FIRST = (
    "test_final_predict.py",
    "reliability/test_faults.py",
    "reliability/test_scaleout.py",
    "reliability/test_slurm.py",
    "test_cli.py",
    "test_trustworthy.py",
    "test_objective.py",
    "test_batch_size.py",
    "test_bad_input.py",
)


def _rank(item: pytest.Item) -> int:
    path = item.path.as_posix()
    return next(
        (i for i, name in enumerate(LONGEST_FIRST) if path.endswith(name)), len(LONGEST_FIRST)
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest files first (a stable sort: each file keeps its order). Tests marked
    `gpu` need CUDA: skipped where there is none (CI, the CPU machines);
    `bash benchmarks/gpu_check.sh` runs them on a GPU and refuses to run without one."""
    items.sort(key=_rank)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: no CUDA device visible")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


# `record_property(SHOWN, text)` in a test: a line of the run's summary, also under xdist
# (whose workers' own output never reaches the terminal), e.g. the sbatch job ids of the
# SLURM tests, so a CI log shows that real jobs ran.
SHOWN = "shown"
_shown: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call":
        _shown.extend(f"{report.nodeid}: {v}" for k, v in report.user_properties if k == SHOWN)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _shown:
        terminalreporter.section("shown by the tests")
        for line in _shown:
            terminalreporter.write_line(line)
