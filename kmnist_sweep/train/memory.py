"""Peak memory of a training run: CUDA's allocator peak on a GPU, the process's peak
resident set (VmHWM) on a CPU. Both are reset at the start of a run, so each trial and each
attempt after a halving reports its own peak.

    reset_peak(device); ...; peak_bytes(device)
"""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path

import torch


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
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
