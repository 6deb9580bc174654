"""A non-editable install runs from any folder: configs and the KMNIST sample ship inside it.

The project's files (as git lists them: the working tree, not a build folder) are copied
out, installed with `pip install --no-deps .` into a fresh virtual environment that reuses
this one's packages (torch is not installed again), and the package is run from an
unrelated temporary folder: `--help`, one epoch on synthetic data, and the bundled sample.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def project_files() -> list[str]:
    """Tracked and untracked-but-not-ignored files, relative to REPO (a sdist: all files)."""
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard", "-z"],
        capture_output=True,
    )
    if listed.returncode != 0:
        return [str(p.relative_to(REPO)) for p in REPO.rglob("*") if not p.is_dir()]
    return [name for name in listed.stdout.decode().split("\0") if name]


def copy_project(dest: Path) -> None:
    for name in project_files():
        source, target = REPO / name, dest / name
        if not source.exists() and not source.is_symlink():
            continue  # deleted in the working tree, not yet in the index
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)  # conf/ stays a link


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, (
        f"{cmd}\nstdout: {out.stdout[-3000:]}\nstderr: {out.stderr[-3000:]}"
    )
    assert "Traceback" not in out.stderr
    return out


def test_a_wheel_install_runs_from_an_unrelated_folder(tmp_path: Path) -> None:
    source, elsewhere = tmp_path / "src" / "kmnist_sweep", tmp_path / "elsewhere"
    copy_project(source)
    elsewhere.mkdir()
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(tmp_path / "venv")
    python = str(tmp_path / "venv" / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "PIP_NO_INDEX": "1"}
    # pip from this environment, installing into the new one; no build isolation: offline.
    run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps"]
        + ["--no-build-isolation", str(source)],
        cwd=elsewhere,
        env=env,
    )
    shutil.rmtree(source)  # nothing may be read from the copy any more

    where = run(
        [python, "-c", "import kmnist_sweep; print(kmnist_sweep.__file__)"], elsewhere, env
    )
    assert Path(where.stdout.strip()).is_relative_to(tmp_path / "venv"), where.stdout

    helped = run([python, "-m", "kmnist_sweep", "--help"], elsewhere, env)
    assert "kmnist_sample" in helped.stdout and "batchsize" in helped.stdout

    one = run([python, "-m", "kmnist_sweep", "data=synthetic", "trainer.epochs=1"], elsewhere, env)
    assert "epoch 1/1" in one.stdout and "final: val/acc" in one.stdout

    # The bundled sample, found inside the installed package (0 epochs: evaluate only).
    sample = run(
        [python, "-m", "kmnist_sweep", "data=kmnist_sample", "trainer.epochs=0"], elsewhere, env
    )
    assert "7200 train / 800 valid / 2000 test" in sample.stdout
    assert "not the official benchmark protocol" in sample.stdout
    leftovers = {p.name for p in elsewhere.iterdir()}
    assert leftovers <= {"sweeps", "wandb"}, leftovers  # Hydra's run folders, nothing else
