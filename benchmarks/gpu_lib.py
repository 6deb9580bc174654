"""What the CUDA benchmark scripts (gpu.py, gpu_pack.py) share: the composed config, random
images on the chosen device, a clock for training steps, a time budget, the figures file."""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
Found = dict[str, float]  # figure key -> value, for the summary against the targets
Row = tuple[str, Callable[[], str]]  # its first cells, and the measurement giving the rest
sys.path.insert(0, str(REPO))

import kmnist_sweep  # noqa: E402, F401  (torchvision compat before fastai)

# isort: split
from fastai.callback.core import Callback  # noqa: E402

from kmnist_sweep.config.search_space import apply_params  # noqa: E402
from kmnist_sweep.data.contract import Dataset, Split  # noqa: E402
from kmnist_sweep.train import engine  # noqa: E402


def config(device: str, **values: Any) -> DictConfig:
    """The project's config with `values` set by dotted key (`{"model.arch": "resnet50"}`
    spelled `**{"model.arch": ...}`), on `device`, with tracking off."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["tracking=disabled"])
    return apply_params(cfg, {"trainer.device": device, **values})


def random_data(n_train: int, n_valid: int, size: int = 28, classes: int = 10) -> Dataset:
    """Uniformly random uint8 images and labels: the arithmetic of real ones, none of the
    files (random rather than zeros: zeros can run faster than real data)."""
    gen = torch.Generator().manual_seed(0)

    def split(n: int) -> Split:
        images = torch.randint(0, 256, (n, size, size), dtype=torch.uint8, generator=gen)
        return Split(images, torch.randint(0, classes, (n,), generator=gen))

    valid = split(n_valid)
    names = [str(i) for i in range(classes)]
    return Dataset("random", names, split(n_train), valid, valid, "acc", "")


def sync(device: torch.device) -> None:
    """Wait for the device's queued work: CUDA runs asynchronously to the host clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free() -> None:
    """Drop the last measurement's model and data before the next one allocates its own."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class TrainClock(Callback):
    """Per epoch: seconds of the training steps from step `skip` on (the first steps warm up
    kernels and allocator; validation excluded), and of the whole epoch with its validation."""

    order = 100  # last: the step's own callbacks (autocast, recorder) are inside the clock

    def __init__(self, skip: int = 0) -> None:
        self.skip = skip
        self.train_s: list[float] = []
        self.epoch_s: list[float] = []
        self.steps = 0  # timed steps per epoch

    def _now(self) -> float:
        sync(self.learn.dls.train.device)
        return time.perf_counter()

    def before_epoch(self) -> None:
        self.epoch_start = self._now()

    def before_batch(self) -> None:
        if self.training and self.learn.iter == self.skip:
            self.train_start = self._now()

    def after_train(self) -> None:
        self.train_s.append(self._now() - self.train_start)
        self.steps = int(self.learn.n_iter) - self.skip

    def after_epoch(self) -> None:
        self.epoch_s.append(self._now() - self.epoch_start)


class Budget:
    """Seconds left of the run: sections stop measuring rather than be killed mid-table."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


class Figures:
    """Markdown printed and appended to a file line by line, so that a run stopped by its
    time limit still leaves every row it measured."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(text + "\n")


def error_line(exc: BaseException) -> str:
    """An exception as one short table cell."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:160] if lines else ''}"


def sizes(tiny: bool) -> dict[str, Any]:
    """Full sizes fit one H200 in under 4 minutes (estimated); tiny ones exercise every
    section on a CPU."""
    if tiny:
        return dict(
            archs=("resnet18",),
            batches=(8, 16),
            grid_steps=2,
            epoch=(256, 64, (32, 64)),
            bare=((16,), 4, 2),
            pack=((1, 2), 1, 32, 256),
            compile_batch=16,
            steps=3,
            backend="eager",
            predict=(64, (32,)),
        )
    return dict(
        archs=("resnet18", "resnet34", "resnet50"),
        batches=(128, 512, 2048),
        grid_steps=None,
        epoch=(60000, 10000, (128, 512, 2048)),
        bare=((128, 512), 64, 5),
        pack=((1, 2, 4, 8), 3, 128, 20000),
        compile_batch=512,
        steps=20,
        backend="inductor",
        predict=(10000, (256, 1024)),
    )


def learner(device: str, data: Dataset, **values: Any) -> engine.Learner:
    return engine.build_learner(config(device, **values), data)


def fit(learn: engine.Learner, epochs: int, clock: TrainClock) -> None:
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(epochs, lr_max=1e-3, cbs=[clock])


def run_rows(
    figures: Figures, args: argparse.Namespace, budget: Budget, rows: Iterable[Row]
) -> None:
    """Measure and print each row; one that would outrun the budget or fails says so in its
    cells, and the next one still runs."""
    for label, measure in rows:
        if budget.left() < args.keep_s + args.reserve_s:
            cells = "not measured: time budget"
        else:
            try:
                cells = measure()
            except Exception as exc:
                cells = f"failed: {error_line(exc)}"
        free()  # here, not in the except block, whose traceback still holds the model
        figures(f"| {label} | {cells} |")
