"""The C allocator's settings for CPU training (train/memory.keep_freed_host_memory), set
by `engine.build_learner` for every trial, `final` and the LR finder: memory a step frees
stays with the process instead of being handed back and faulted in again the next step.

Each check runs in a fresh process: the test process's heap has been shaped, and its
thresholds possibly set, by every test before it."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

REPO = Path(__file__).resolve().parents[2]

# Frees 3 x 16 MiB from the top of the heap and allocates them again (a fresh process's
# adaptive trim threshold lies below 48 MiB, so glibc hands them back): the page faults of
# that second allocation, before and after building a learner on the CPU.
SCRIPT = r"""
import ctypes, resource
from hydra import compose, initialize_config_dir
from kmnist_sweep.data.datasets import load_dataset
from kmnist_sweep.train import engine

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
SIZE = 16 * 2**20

def refault() -> int:
    for _ in range(2):
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        blocks = [libc.malloc(SIZE) for _ in range(3)]
        for block in blocks:
            libc.memset(block, 1, SIZE)
        for block in blocks:
            libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

before = refault()
with initialize_config_dir(config_dir=CONF, version_base="1.3"):
    cfg = compose(config_name="config", overrides=["data=synthetic", "trainer.device=cpu"])
engine.build_learner(cfg, load_dataset(cfg.data))
print(before, refault())
"""


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc"
)
def test_a_cpu_learner_keeps_freed_memory_instead_of_faulting_it_in_again() -> None:
    code = f"CONF = {str(REPO / 'conf')!r}\n{SCRIPT}"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    before, after = (int(n) for n in out.stdout.split()[-2:])
    pages = 3 * 16 * 2**20 // 4096
    assert before >= pages * 0.9  # handed back and faulted in page by page
    assert after < pages * 0.01  # reused where it lay


@pytest.mark.slow
@pytest.mark.skipif(platform.system() != "Linux", reason="peak RSS reset through /proc")
def test_a_trials_peak_memory_on_a_cpu_is_its_own(tmp_path: Path) -> None:
    """memory/peak_mb of a ResNet-18 trial run after a ResNet-50 trial in the same worker,
    and of the same trial run alone in a fresh process: the heap the large trial freed and
    the allocator kept must not count towards the small trial's peak (it did: the ResNet-18
    trial reported the ResNet-50 trial's peak)."""
    from tests.conftest import run_cli

    def sweep(name: str, archs: str) -> list[tuple[str, float]]:
        space = f"{{model.arch: {{type: categorical, choices: {archs}}}}}"
        args = ["data=synthetic", "data.n_train=1152", "trainer.epochs=1", "trainer.threads=1"]
        args += ["trainer.batch_size=256", "batch_size.diverge_factor=1000"]  # no halving
        args += [f"+search_space={space}", f"study.name={name}", "study.sampler.type=grid"]
        args += [f"study.n_trials={archs.count(',') + 1}", "study.sampler.seed=1"]
        args += ["study.pruner.type=none", "study.report=false", "tracking=disabled"]
        out = run_cli(*args, "study.workers=1", cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        url = f"sqlite:///{tmp_path}/storage/{name}.db"
        trials = optuna.load_study(study_name=name, storage=url).trials
        return [(t.params["model.arch"], t.user_attrs["memory/peak_mb"]) for t in trials]

    (big, big_mb), (small, after_big_mb) = sweep("after-big", "[resnet50, resnet18]")
    assert (big, small) == ("resnet50", "resnet18")  # the grid's order for this seed
    [(_, alone_mb)] = sweep("alone", "[resnet18]")
    assert big_mb > 1.2 * alone_mb, (big_mb, alone_mb)  # the large model does need more
    # Nearer its own peak than the large trial's (the allocator's caches of the large model
    # stay with the process; what the large trial freed does not count).
    assert after_big_mb - alone_mb < 0.5 * (big_mb - alone_mb), (big_mb, after_big_mb, alone_mb)
