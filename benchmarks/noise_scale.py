"""What measuring the gradient noise scale costs, run by hand:
`python benchmarks/noise_scale.py [--sizes 64 256 1024] [--every 8] [--epochs 1]`.

Trains resnet18 on kmnist_sample at each batch size twice, interleaved: measuring off
(trainer.noise_scale_every=0) and on. Prints a markdown table per size: training seconds per
epoch without and with the measurement (the engine keeps the measuring seconds out of its
training time, so both should agree), the measuring seconds per epoch, their share of an
epoch, the measured steps per epoch and the last epoch's B_simple.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kmnist_sweep.data.datasets import load_dataset  # noqa: E402
from kmnist_sweep.train import engine  # noqa: E402
from kmnist_sweep.train.noise_scale import LEAST, NOISE_SCALE_KEY  # noqa: E402


def compose_cfg(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def measured_steps(steps: int, every: int) -> int:
    """Steps per epoch the callback measures (train/noise_scale.py's rule)."""
    interval = max(1, min(every, steps // LEAST))
    return math.ceil(steps / interval)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--every", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(
        "| batch | s/epoch off | s/epoch on (training) | measuring s/epoch | share "
        "| measured steps/epoch | B_simple, last epoch |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        runs = {}
        for every in (0, args.every):
            cfg = compose_cfg(
                "data=kmnist_sample",
                f"trainer.epochs={args.epochs}",
                f"trainer.batch_size={size}",
                f"trainer.noise_scale_every={every}",
            )
            data = load_dataset(cfg.data)
            runs[every] = engine.train(cfg, data, quiet=True)
        off, on = runs[0], runs[args.every]
        epochs = len(on.history)
        measuring = on.noise_seconds / epochs
        steps = len(on.learner.dls.train) if on.learner is not None else 0
        value = on.history[-1].get(NOISE_SCALE_KEY)
        shown = "undefined" if value is None else f"{value:.0f}"
        print(
            f"| {size} | {off.seconds_per_epoch:.1f} | {on.seconds_per_epoch:.1f} "
            f"| {measuring:.1f} | {measuring / on.seconds_per_epoch:.0%} "
            f"| {measured_steps(steps, args.every)} of {steps} | {shown} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
