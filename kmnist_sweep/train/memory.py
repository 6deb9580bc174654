"""Host memory of a training run: its peak (CUDA's allocator peak on a GPU, the process's
peak resident set, VmHWM, on a CPU), reset at the start of a run (after handing back what
earlier runs freed) so each trial and each attempt after a halving reports its own; and the
C allocator's settings for CPU training.

    keep_freed_host_memory(); reset_peak(device); ...; peak_bytes(device)
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import platform
import resource
from pathlib import Path

import torch

# glibc hands memory back to the OS when more than a trim threshold lies free at the top of
# its heap, and adapts that threshold as blocks come and go. A training step frees and
# allocates tens of MB (gradients, activations) every step; when the heap's layout puts them
# at its top, they are handed back and every page of them faults in again on the next step.
# The weight average's two model copies made that happen at every step (benchmarks/engine.py
# --part 1 --malloc-default counts the page faults; docs/benchmarks.md). Fixed thresholds keep
# freed memory with the process, so the peak resident set is what it was; what changes is
# that memory a run has freed is not returned to the OS until the process ends.
TRIM_THRESHOLD = 2**30  # bytes free at the heap's top before glibc returns them
MMAP_THRESHOLD = 32 * 2**20  # bytes; glibc's largest, and the most its adaptive one reaches
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


@functools.cache  # once per process: platform.libc_ver() reads the Python executable
def _glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@functools.cache
def keep_freed_host_memory() -> bool:
    """Fix glibc's malloc thresholds for this process. False, and nothing changed, where
    the C library is not glibc (macOS, musl)."""
    if not _glibc():
        return False
    mallopt = ctypes.CDLL(None).mallopt
    # Both at once: setting either one stops glibc adapting the other, and a fixed mmap
    # threshold at its 128 KiB default would map and unmap every tensor over it.
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    # What earlier runs of this process freed is still resident (keep_freed_host_memory),
    # and the peak would start from it: collect their Learners (reference cycles) and hand
    # the freed memory back, so a run's peak is its own plus what is alive (the data).
    gc.collect()
    if _glibc():
        ctypes.CDLL(None).malloc_trim(0)
    # Writing 5 to clear_refs resets the peak RSS (Linux >= 4.0); elsewhere the peak stays
    # the process's lifetime peak, which still bounds the run's.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_bytes(device: torch.device) -> int:
    """Bytes: CUDA's max_memory_allocated, or the peak RSS of this process."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # kB on Linux
