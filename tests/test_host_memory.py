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

import pytest

REPO = Path(__file__).resolve().parents[1]

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
