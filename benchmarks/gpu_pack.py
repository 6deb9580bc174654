"""Benchmark part 3d: trials per hour with 1, 2, 4 and 8 trials packed on one GPU.

A small trial is mostly Python launching kernels, so one process leaves the GPU idle much of
the time; several processes sharing it (`study.workers_per_gpu`) fill those gaps. Each
process here is started, imports, warms up and says `ready` before any clock runs (a
sweep's workers pay that once, not per trial); then N of them run K trials each at once,
and trials per hour = N x K / wall seconds x 3600. A trial is what the objective runs:
`engine.train` on a fresh model over data loaded once per process.

    python benchmarks/gpu_pack.py --worker ...   # one process; gpu.py starts them
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from gpu_lib import Budget, Figures, config, free, random_data

from kmnist_sweep.train import engine

HERE = Path(__file__).resolve().parent
PREFIX = "PACK "  # protocol lines on stdout; anything else a library prints is skipped


def trial_config(args: argparse.Namespace) -> Any:
    return config(
        args.device,
        **{
            "model.arch": "resnet18",
            "model.stem": "imagenet",
            "trainer.batch_size": args.batch,
            "trainer.epochs": args.epochs,
        },
    )


def worker(args: argparse.Namespace) -> None:
    """One packed process: warm up, say ready, then `run K` -> K trials -> their seconds."""
    cfg = trial_config(args)
    data = random_data(args.images, max(args.images // 10, 64))
    engine.train(cfg, data, quiet=True)  # CUDA context, cuDNN and cuBLAS handles, kernels
    free()
    print(f"{PREFIX}ready", flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] != "run":
            break
        seconds = []
        for _ in range(int(words[1])):
            start = time.perf_counter()
            engine.train(cfg, data, quiet=True)  # ends on the validation metrics: synced
            seconds.append(time.perf_counter() - start)
            free()
        print(PREFIX + json.dumps({"seconds": seconds}), flush=True)


def read_reply(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(PREFIX):
            return line[len(PREFIX) :].strip()
    raise RuntimeError(f"packed worker {proc.pid} exited ({proc.wait()}) without replying")


def measure(
    figures: Figures, args: argparse.Namespace, budget: Budget, counts: tuple[int, ...]
) -> dict[int, float]:
    """Trials per hour for each count of packed processes; prints the table."""
    cmd = [sys.executable, str(HERE / "gpu_pack.py"), "--worker", "--device", args.device]
    cmd += ["--batch", str(args.batch), "--epochs", str(args.epochs)]
    cmd += ["--images", str(args.images)]
    logs: list[IO[str]] = []
    procs: list[subprocess.Popen[str]] = []
    per_hour: dict[int, float] = {}
    figures(
        f"\n### 3d. Trials packed on one device (resnet18 imagenet stem, batch {args.batch}, "
        f"{args.epochs} epoch(s) of {args.images} images, precision auto; {args.trials} "
        "trials per process)\n"
    )
    figures("| processes | trials | wall s | s per trial (mean) | trials/hour | vs 1 |")
    figures("|---|---|---|---|---|---|")
    try:
        for _ in range(max(counts)):
            log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (read back on failure)
            logs.append(log)
            procs.append(
                subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=log, text=True)
            )  # fmt: skip
        for proc in procs:
            read_reply(proc)  # ready
        for n in counts:
            if budget.left() < args.keep_s:
                figures(f"| {n} | not measured: time budget spent | | | | |")
                continue
            start = time.perf_counter()
            for proc in procs[:n]:
                assert proc.stdin is not None
                proc.stdin.write(f"run {args.trials}\n")
                proc.stdin.flush()
            seconds = [s for p in procs[:n] for s in json.loads(read_reply(p))["seconds"]]
            wall = time.perf_counter() - start
            per_hour[n] = len(seconds) / wall * 3600
            ratio = per_hour[n] / per_hour[1] if 1 in per_hour else float("nan")
            figures(
                f"| {n} | {len(seconds)} | {wall:.2f} | {sum(seconds) / len(seconds):.2f} "
                f"| {per_hour[n]:.0f} | {ratio:.2f}x |"
            )
    except Exception:
        for log in logs:
            log.seek(0)
            tail = log.read()[-1500:]
            if tail.strip():
                print(tail, file=sys.stderr)
        raise
    finally:
        for proc in procs:
            if proc.poll() is None and proc.stdin is not None:
                proc.stdin.close()  # end of input: the worker's loop ends
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    return per_hour


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--images", type=int, default=20000)
    worker(parser.parse_args())


if __name__ == "__main__":
    main()
