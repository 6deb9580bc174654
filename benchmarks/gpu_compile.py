"""Benchmark part 3e, torch.compile: what compiling the model would buy a sweep, and what
each trial would pay for it. The engine does not compile; this measures a bare training
loop (the engine's model, batches, precision and fused AdamW) on one shape: eager steps; a
fresh model compiled cold (tracing and compiling forward and backward); a second fresh
model of the same shape in the same process (a sweep's next trial in one worker); and one
in a new process (a new worker, with the compile caches the first left on disk).

    python benchmarks/gpu_compile.py --device cuda   # the new-process row; gpu.py runs it
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from gpu_lib import Budget, Figures, Found, config, random_data, run_rows, sizes, sync
from torch import nn

from kmnist_sweep.config.device import pick_device, use_bf16
from kmnist_sweep.train import engine
from kmnist_sweep.train.model import build_model

HERE = Path(__file__).resolve().parent


def train_step(model: nn.Module, batches: list[Any], bf16: bool) -> Callable[[int], None]:
    """A training step of `model` on batch i: AdamW, bf16 autocast where the engine uses it."""
    device = next(model.parameters()).device
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step(i: int) -> None:
        x, y = batches[i % len(batches)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def timed(step: Callable[[int], None], first: int, count: int, device: torch.device) -> float:
    """Seconds of steps first..first+count-1, the device synchronised at both ends."""
    sync(device)
    start = time.perf_counter()
    for i in range(first, first + count):
        step(i)
    sync(device)
    return time.perf_counter() - start


class CompileBench:
    """One model shape: eager steps, then compiled models of it, each a new trial's."""

    def __init__(self, args: argparse.Namespace) -> None:
        s = sizes(args.tiny)
        self.backend, self.steps = s["backend"], s["steps"]
        self.cfg = config(args.device, **{"trainer.batch_size": s["compile_batch"]})
        self.device = pick_device(args.device)
        self.bf16 = use_bf16(str(self.cfg.trainer.precision), self.device)
        learn = engine.build_learner(self.cfg, random_data(4 * s["compile_batch"], 64))
        self.batches = list(learn.dls.train)  # device tensors, channels-last as the engine's

    def model(self, compiled: bool) -> Callable[[int], None]:
        net = build_model(self.cfg.model, 10).to(self.device)
        net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        if compiled:
            net = torch.compile(net, backend=self.backend)  # type: ignore[assignment]
        return train_step(net, self.batches, self.bf16)

    def compiled(self) -> tuple[float, Callable[[int], None]]:
        """A fresh model, compiled: seconds of its first step (tracing, compiling forward and
        backward, running), and its step for more."""
        step = self.model(compiled=True)
        return timed(step, 0, 1, self.device), step

    def step_ms(self, step: Callable[[int], None]) -> float:
        timed(step, 0, 3, self.device)  # warm: allocator, kernels, autotuning
        return timed(step, 3, self.steps, self.device) / self.steps * 1000


def child(args: argparse.Namespace) -> None:
    """A new process, as a new worker's first trial: its first compiled step, with the
    compile caches the parent left on disk."""
    bench = CompileBench(args)
    timed(bench.model(compiled=False), 0, 2, bench.device)  # CUDA and cuDNN start-up
    print(json.dumps({"first_s": bench.compiled()[0]}))


def compile_section(
    figures: Figures, args: argparse.Namespace, budget: Budget, found: Found
) -> None:
    s = sizes(args.tiny)
    state: dict[str, Any] = {}

    def eager() -> str:
        state["bench"] = bench = CompileBench(args)
        state["eager_ms"] = ms = bench.step_ms(bench.model(compiled=False))
        return f" | {ms:.2f} | 1.00x"

    def compiled(which: str) -> str:
        bench = state["bench"]
        first, step = bench.compiled()
        ms = bench.step_ms(step)
        found[f"e/{which}"] = first
        return f"{first:.1f} | {ms:.2f} | {state['eager_ms'] / ms:.2f}x"

    def new_process() -> str:
        cmd = [sys.executable, str(HERE / "gpu_compile.py"), "--device", args.device]
        cmd += ["--tiny"] if args.tiny else []
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=budget.left() - 5)
        replies = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        if out.returncode != 0 or not replies:
            raise RuntimeError((out.stderr.strip().splitlines() or ["no reply"])[-1])
        return f"{json.loads(replies[-1])['first_s']:.1f} | |"

    figures(
        f"\n### 3e. torch.compile (backend {s['backend']}, resnet18 imagenet stem, batch "
        f"{s['compile_batch']}, bare loop, the tool's precision; the engine does not compile; "
        "seconds: a fresh model's first step)\n"
    )
    figures("| what | first step s | ms/step | speed-up |")
    figures("|---|---|---|---|")
    args.keep_s += 30  # a cold compile takes tens of seconds: start none on the last ones
    run_rows(
        figures,
        args,
        budget,
        [
            ("eager", eager),
            ("first trial (cold compile)", partial(compiled, "cold")),
            ("next trial, same process, fresh model", partial(compiled, "same process")),
            ("next trial, new process (caches on disk)", new_process),
        ],
    )
    args.keep_s -= 30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    child(parser.parse_args())


if __name__ == "__main__":
    main()
