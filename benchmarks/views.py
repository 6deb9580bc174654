"""Test-time views benchmark, run by hand: `python benchmarks/views.py [--seeds 0 1 2]`.

What averaging the softmax over shifted copies of each test image (`trainer.test_views`,
kmnist_sweep/train/views.py) is worth on kmnist_sample. For each seed it trains one model
exactly as `python -m kmnist_sweep data=kmnist_sample seed=S` does (the same config, data,
learner and fit, through `engine.train`), then scores the same weights on the 800 validation
and 2,000 held-out test images with 1, 5 and 9 views, and times each scoring. One training
per seed serves all three counts, so the columns differ only in the views. Extra arguments
are config overrides (`trainer.epochs=3`). Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from engine import compose_cfg, machine  # benchmarks/engine.py
from fastai.learner import Learner

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kmnist_sweep.config.schema import TEST_VIEW_COUNTS  # noqa: E402
from kmnist_sweep.data.contract import Split  # noqa: E402
from kmnist_sweep.data.datasets import load_dataset  # noqa: E402
from kmnist_sweep.train import engine  # noqa: E402
from kmnist_sweep.train.views import class_probabilities, split_metrics  # noqa: E402


def score(learn: Learner, split: Split, views: int, classes: int) -> tuple[float, float]:
    """(accuracy, seconds) of the learner's model on `split` with `views` views."""
    dl = learn.dls.train
    start = time.perf_counter()
    probs = class_probabilities(
        learn.model, split.images, dl.mean, dl.std, views=views, device=learn.dls.device, batch=256
    )
    seconds = time.perf_counter() - start
    return split_metrics(probs, split.labels, classes, "s")["s/acc"], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args, overrides = parser.parse_known_args()
    print(f"machine: {machine()}", flush=True)
    rows: dict[int, dict[str, list[float]]] = {}
    for seed in args.seeds:
        cfg = compose_cfg("data=kmnist_sample", f"seed={seed}", "tracking=disabled", *overrides)
        data = load_dataset(cfg.data)
        start = time.perf_counter()
        result = engine.train(cfg, data, quiet=True)
        print(f"seed {seed}: trained in {time.perf_counter() - start:.1f} s", flush=True)
        assert result.learner is not None
        for views in TEST_VIEW_COUNTS:
            row = rows.setdefault(views, {"val": [], "test": [], "test_s": []})
            val, _ = score(result.learner, data.valid, views, data.num_classes)
            test, seconds = score(result.learner, data.test, views, data.num_classes)
            row["val"].append(val)
            row["test"].append(test)
            row["test_s"].append(seconds)
            print(f"  {views} views: val {val:.4f}  test {test:.4f}  ({seconds:.2f} s)")
    seeds = " | ".join(f"seed {s}" for s in args.seeds)
    print(f"\n| views | val/acc {seeds} | test/acc {seeds} | test mean | s to score 2,000 |")
    print("|---|" + "---|" * (2 * len(args.seeds) + 2))
    for views, row in rows.items():
        cells = [f"{v:.4f}" for v in row["val"] + row["test"]]
        mean, secs = statistics.mean(row["test"]), statistics.median(row["test_s"])
        print(f"| {views} | " + " | ".join(cells) + f" | {mean:.4f} | {secs:.2f} |")


if __name__ == "__main__":
    torch.set_flush_denormal(True)
    main()
