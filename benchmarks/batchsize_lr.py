"""Which LR a batch-size sweep should give each size: fixed, or from the LR finder (which
rule, which scaling). Runs `+sweep=batchsize data=kmnist_sample` once per variant, in
temporary folders, and prints one markdown table per variant and a summary.

    python benchmarks/batchsize_lr.py                       # sizes 32..512, 3 epochs
    python benchmarks/batchsize_lr.py --high 2048 --variants minimum-sqrt

Accuracy is the held-out validation accuracy of kmnist_sample (not the official protocol);
images/s depends on what else the machine runs (the load average is printed).
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    # name -> overrides on top of +sweep=batchsize
    "fixed-3e-3": ["++search_space.trainer.lr=null", "trainer.lr=3e-3"],
    "valley-sqrt": ["lr_finder.suggestion=valley", "lr_finder.scale=sqrt"],
    "minimum-sqrt": ["lr_finder.suggestion=minimum", "lr_finder.scale=sqrt"],
    "minimum-linear": ["lr_finder.suggestion=minimum", "lr_finder.scale=linear"],
}


def run_variant(name: str, high: int, epochs: int) -> list[dict[str, str]]:
    sizes = high.bit_length() - 5  # 32 .. high
    args = [
        "+sweep=batchsize",
        "data=kmnist_sample",
        "tracking=disabled",
        f"trainer.epochs={epochs}",
        f"++search_space.trainer.batch_size.high={high}",
        f"study.n_trials={sizes}",
        # AdamW's recipe, the default when the variants were chosen, whatever it is now.
        "trainer.optimizer=adamw",
        "trainer.weight_decay=0.05",
        "trainer.cutout=0",
        "trainer.batch_size=128",  # the reference batch of the range test
        *VARIANTS[name],
    ]
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "kmnist_sweep", *args],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"{name}: exit {done.returncode}\n{done.stderr[-3000:]}")
        table = Path(tmp) / "sweeps" / "batchsize-kmnist_sample" / "trials.csv"
        with table.open() as f:
            rows = list(csv.DictReader(f))
    answer = [line for line in done.stdout.splitlines() if line.startswith("batch size:")]
    print(f"\n### {name} ({seconds:.0f} s; load {os.getloadavg()[0]:.1f})")
    print(f"`python -m kmnist_sweep {' '.join(args)}`\n")
    print("| batch | val/acc | LR | images/s | s/epoch | peak MiB |")
    print("|---|---|---|---|---|---|")
    for row in sorted(rows, key=lambda r: int(r["batch_size/requested"])):
        print(
            f"| {row['batch_size/requested']} | {float(row['value']):.4f} | "
            f"{float(row['lr/value']):.3g} | {row['speed/images_per_s']} | "
            f"{row['speed/s_per_epoch']} | {row['memory/peak_mb']} |"
        )
    if answer:
        print(f"\n{answer[0]}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--high", type=int, default=512, help="largest batch size (power of 2)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per trial")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ns = parser.parse_args()
    summary = []
    for name in ns.variants:
        rows = run_variant(name, ns.high, ns.epochs)
        accs = [float(r["value"]) for r in rows]
        summary.append((name, max(accs), min(accs), sum(accs) / len(accs)))
    print("\n| variant | best val/acc | worst | mean | worst below best (points) |")
    print("|---|---|---|---|---|")
    for name, best, worst, mean in summary:
        print(f"| {name} | {best:.4f} | {worst:.4f} | {mean:.4f} | {100 * (best - worst):.2f} |")


if __name__ == "__main__":
    main()
