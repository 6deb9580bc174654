"""Which device and arithmetic `trainer.device` and `trainer.precision` mean on this machine.
Checked once with the rest of the config (an unusable choice is a ConfigError); the engine
asks the same functions afterwards.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kmnist_sweep.errors import ConfigError


def pick_device(name: str) -> torch.device:
    """`auto` is the first GPU when there is one; an unusable choice is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(
            f"trainer.device={name!r} is not a device (auto, cpu, cuda, cuda:N)"
        ) from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name!r} but no CUDA device is visible")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(
            f"trainer.device={name!r} but only {torch.cuda.device_count()} CUDA device(s) "
            "are visible"
        )
    return device


def cpu_has_bf16() -> bool:
    """Native bf16 arithmetic (AVX512-BF16 or AMX); elsewhere CPU autocast emulates it, slowly."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def has_native_bf16(device: torch.device) -> bool:
    """bf16 in hardware: CUDA GPUs from Ampere on (not Turing or older), or such a CPU."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    return cpu_has_bf16()


def use_bf16(precision: str, device: torch.device) -> bool:
    """`auto`: bf16 autocast on a CUDA GPU that has it, fp32 elsewhere; `bf16` where the
    hardware has it (GPU or CPU), else an error.

    Not `auto` on CPUs: bf16 autocast training on a CPU with native bf16 gave a NaN loss a
    few steps into some runs after earlier runs in the same process, where fp32 did not. The
    guard then halves the batch, so a sweep would record a smaller batch than the trial asked
    for. See docs/benchmarks.md ("bf16 on CPU")."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"trainer.precision={precision!r} is not auto, bf16 or fp32")
    if precision == "fp32":
        return False
    native = has_native_bf16(device)
    if precision == "bf16" and not native:
        raise ConfigError("trainer.precision=bf16 needs a GPU or CPU with native bf16")
    return native and (precision == "bf16" or device.type == "cuda")
