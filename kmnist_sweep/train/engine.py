"""Training one model: a fastai Learner over device-resident data (train/loader.py),
one-cycle fit, bf16 autocast where the hardware has it, evaluation, and what the run cost.

    result = train(cfg, dataset, on_epoch=hook)     # TrainResult: metrics, speed, memory
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from fastai.callback.core import Callback
from fastai.callback.schedule import fit_one_cycle  # noqa: F401  (patches Learner)
from fastai.learner import Learner
from fastai.metrics import Metric, accuracy
from fastai.optimizer import OptimWrapper
from omegaconf import DictConfig
from torch import nn

from kmnist_sweep.config.device import pick_device, use_bf16
from kmnist_sweep.data.contract import Dataset
from kmnist_sweep.train import memory
from kmnist_sweep.train.ema import WeightAverage
from kmnist_sweep.train.loader import make_loaders, use_channels_last
from kmnist_sweep.train.metrics import balanced_accuracy, recall_counts
from kmnist_sweep.train.model import build_model
from kmnist_sweep.train.noise_scale import NOISE_SCALE_KEY, NoiseScale
from kmnist_sweep.train.views import class_probabilities, split_metrics

EpochHook = Callable[[int, dict[str, float]], None]
TRAIN_STEPS = "train/steps"  # per-epoch metric: optimiser steps so far
TRAIN_SECONDS = "train/seconds"  # per-epoch metric: seconds in training phases so far


# ---------------------------------------------------------------- device and precision


class Autocast(Callback):
    """bf16 autocast around forward and loss; bf16 has fp32's range, so no loss scaling."""

    order = 10

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type
        self.ctx: torch.autocast | None = None

    def before_batch(self) -> None:
        self.close()
        if torch.is_autocast_enabled(self.device_type):
            # Another Autocast (a user's callback) opened the region this batch: nesting a
            # second one would be left first-in-first-out after the loss and restore "on".
            return
        self.ctx = torch.autocast(self.device_type, dtype=torch.bfloat16)
        self.ctx.__enter__()

    def after_pred(self) -> None:
        self.learn.pred = self.learn.pred.float()  # the loss and metrics in fp32

    def after_loss(self) -> None:
        self.close()

    def after_cancel_batch(self) -> None:
        self.close()

    def close(self) -> None:
        """Leave the autocast region. fastai calls no event when an error (an OOM in the
        forward pass) leaves the batch, so `train` calls this on its way out too: a region
        left open would run the halved retry, fp32 or not, under autocast."""
        if self.ctx is not None:
            ctx, self.ctx = self.ctx, None
            ctx.__exit__(None, None, None)


def close_autocast(learn: Learner) -> None:
    for cb in learn.cbs:
        if isinstance(cb, Autocast):
            cb.close()


# ---------------------------------------------------------------- metrics


class BalancedAccuracy(Metric):
    """Mean per-class recall: K49's classes range from ~400 to ~7000 images."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.reset()

    def reset(self) -> None:
        self.hits = torch.zeros(self.num_classes, dtype=torch.long)
        self.total = torch.zeros(self.num_classes, dtype=torch.long)

    def accumulate(self, learn: Learner) -> None:
        hits, total = recall_counts(learn.y, learn.pred.argmax(dim=-1), self.num_classes)
        self.hits += hits
        self.total += total

    @property
    def value(self) -> float:
        return balanced_accuracy(self.hits, self.total)

    @property
    def name(self) -> str:
        return "bacc"


def metric_keys(metric_names: list[str], prefix: str) -> list[str]:
    return [f"{prefix}/{'acc' if n == 'accuracy' else n}" for n in metric_names]


# ---------------------------------------------------------------- learner and training


class EpochReport(Callback):
    """Hands each epoch's metrics to `hook`; an exception it raises (e.g. a prune) stops fit."""

    order = 70  # after fastai's Recorder (50) has written the epoch's log

    def __init__(
        self,
        hook: EpochHook,
        epoch_offset: int = 0,
        echo: bool = False,
        noise: NoiseScale | None = None,
    ) -> None:
        self.hook = hook
        self.noise = noise  # its epoch's value joins the metrics; its seconds are not training
        self.epoch_offset = epoch_offset
        self.echo = echo  # one line per epoch where fastai's bars would garble a log file
        self.train_seconds = 0.0  # seconds in training phases only (no validation)
        self.train_images = 0  # images trained on
        self.train_steps = 0  # optimiser steps taken

    def before_train(self) -> None:
        self.started = time.perf_counter()
        self.measuring = self.noise.seconds if self.noise is not None else 0.0

    def after_train(self) -> None:
        if self.learn.dls.device.type == "cuda":
            torch.cuda.synchronize()  # the clock stops when the GPU is done, not the Python
        elapsed = time.perf_counter() - self.started
        if self.noise is not None:  # measuring the noise scale is not training
            elapsed -= self.noise.seconds - self.measuring
        self.train_seconds += elapsed
        self.train_images += int(self.learn.dls.train.n)
        self.train_steps += int(self.learn.n_iter)

    def after_epoch(self) -> None:
        rec = self.learn.recorder
        names = rec.metric_names[1:-1]  # drop "epoch" and "time"
        values = dict(zip(names, rec.log[1:-1], strict=True))
        metrics = {
            "train/loss": float(values["train_loss"]),
            "val/loss": float(values["valid_loss"]),
            "lr": float(self.learn.opt.hypers[-1]["lr"]),
        }
        for name in names[2:]:
            metrics[metric_keys([name], "val")[0]] = float(values[name])
        if self.noise is not None and self.noise.values and self.noise.values[-1] is not None:
            metrics[NOISE_SCALE_KEY] = self.noise.values[-1]
        # Where the run stands: what a validation curve is drawn against.
        metrics[TRAIN_STEPS] = float(self.train_steps)
        metrics[TRAIN_SECONDS] = round(self.train_seconds, 3)
        epoch = self.epoch_offset + self.learn.epoch + 1
        if self.echo:
            shown = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            print(f"epoch {epoch}/{self.epoch_offset + self.learn.n_epoch}  {shown}", flush=True)
        self.hook(epoch, metrics)


def build_learner(
    cfg: DictConfig, dataset: Dataset, batch_size: int | None = None, seed: int | None = None
) -> Learner:
    """A fastai Learner for `cfg` (the whole composed config) on device-resident data."""
    tcfg = cfg.trainer
    seed = int(cfg.seed if seed is None else seed)
    device = pick_device(str(tcfg.device))
    if device.type == "cpu":
        if int(tcfg.threads) > 0:
            torch.set_num_threads(int(tcfg.threads))
        # Late in one-cycle, tiny gradients turn denormal and x86 slows down on them;
        # flushing them to zero costs nothing.
        torch.set_flush_denormal(True)
        memory.keep_freed_host_memory()  # freed tensors stay with the process (memory.py)
    torch.manual_seed(seed)
    model = build_model(cfg.model, dataset.num_classes)
    if use_channels_last(tcfg.channels_last, device):
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    bs = int(tcfg.batch_size if batch_size is None else batch_size)
    dls = make_loaders(dataset, tcfg, bs, device, seed)
    metrics: list[Any] = [accuracy]
    if dataset.metric == "bacc":
        metrics.append(BalancedAccuracy(dataset.num_classes))
    learn = Learner(
        dls,
        model.to(device),
        loss_func=nn.CrossEntropyLoss(label_smoothing=float(tcfg.label_smoothing)),
        opt_func=_opt_func(tcfg),
        metrics=metrics,
        wd=float(tcfg.weight_decay),
        moms=one_cycle_moms(float(tcfg.momentum)),
    )
    if use_bf16(str(tcfg.precision), device):
        learn.add_cb(Autocast(device.type))
    return learn


def one_cycle_moms(momentum: float) -> tuple[float, float, float]:
    """One-cycle's momentum schedule (start, middle, end): trainer.momentum at both ends and
    at most 0.85 at peak LR. fastai schedules it into AdamW's beta1 and SGD's momentum
    alike, so it is the one place trainer.momentum takes effect for either."""
    return (momentum, min(momentum, 0.85), momentum)


def _opt_func(tcfg: DictConfig) -> Callable[..., OptimWrapper]:
    # PyTorch's fused optimisers update every parameter in one kernel, on a CUDA GPU and on
    # a CPU alike; torch's default (foreach) ones take several passes (docs/benchmarks.md,
    # `python benchmarks/engine.py --part 4`).
    if tcfg.optimizer == "adamw":
        return partial(OptimWrapper, opt=partial(torch.optim.AdamW, fused=True))
    # Nesterov needs a non-zero momentum; the schedule above sets its value each step.
    momentum = float(tcfg.momentum)
    sgd = partial(torch.optim.SGD, momentum=momentum, nesterov=momentum > 0, fused=True)
    return partial(OptimWrapper, opt=sgd)


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per epoch
    valid: dict[str, float] = field(default_factory=dict)  # final validation metrics
    test: dict[str, float] = field(default_factory=dict)  # empty unless asked for
    seconds: float = 0.0  # wall time of fit + evaluation
    train_seconds: float = 0.0  # seconds spent in training phases (no validation)
    train_images: int = 0  # images trained on, all epochs
    noise_seconds: float = 0.0  # measuring the gradient noise scale (not in train_seconds)
    peak_memory: int = 0  # bytes: CUDA max_memory_allocated, or peak RSS on a CPU
    learner: Learner | None = None

    @property
    def images_per_s(self) -> float:
        """Training throughput, validation excluded."""
        return self.train_images / self.train_seconds if self.train_seconds else 0.0

    @property
    def seconds_per_epoch(self) -> float:
        epochs = len(self.history)
        return self.train_seconds / epochs if epochs else 0.0


def evaluate(learn: Learner, ds_idx: int, prefix: str) -> dict[str, float]:
    """Loss and metrics of the model as it stands on loader `ds_idx` (1 valid, 2 test)."""
    with learn.no_bar():
        values = learn.validate(ds_idx=ds_idx)
    names = ["loss"] + [("acc" if m.name == "accuracy" else m.name) for m in learn.metrics]
    return {f"{prefix}/{n}": float(v) for n, v in zip(names, values, strict=True)}


def test_metrics(learn: Learner, views: int, num_classes: int) -> dict[str, float]:
    """The test split's loss, accuracy and balanced accuracy, the model's probabilities
    averaged over `views` test-time views (train/views.py) in fp32: what `final` stores and
    `predict` gives for the same weights."""
    split = learn.dls[2]
    probs = class_probabilities(
        learn.model,
        split.images,
        split.mean,
        split.std,
        views=views,
        device=learn.dls.device,
        batch=split.bs,
    )
    return split_metrics(probs, split.labels, num_classes, "test")


def train(
    cfg: DictConfig,
    dataset: Dataset,
    on_epoch: EpochHook | None = None,
    *,
    test: bool = False,
    learn: Learner | None = None,
    quiet: bool = False,
    cbs: list[Callback] | None = None,
) -> TrainResult:
    """One-cycle training for `cfg.trainer.epochs` epochs (0 evaluates the untrained net)."""
    epochs = int(cfg.trainer.epochs)
    learn = learn or build_learner(cfg, dataset)
    result = TrainResult(learner=learn)

    def record(epoch: int, metrics: dict[str, float]) -> None:
        result.history.append({"epoch": float(epoch), **metrics})
        if on_epoch is not None:
            on_epoch(epoch, metrics)

    bars = not quiet and sys.stderr.isatty()
    start = time.perf_counter()
    memory.reset_peak(learn.dls.device)
    if epochs > 0:
        every = int(cfg.trainer.noise_scale_every)
        noise = NoiseScale(every) if every > 0 else None
        report = EpochReport(record, echo=not bars and not quiet, noise=noise)
        ema = float(cfg.trainer.ema)
        averaged = [WeightAverage(ema)] if ema > 0 else []
        measured = [noise] if noise is not None else []
        with contextlib.ExitStack() as stack:
            stack.callback(close_autocast, learn)  # also when an error leaves the batch
            if not bars:
                stack.enter_context(learn.no_bar())
                stack.enter_context(learn.no_logging())
            learn.fit_one_cycle(
                epochs,
                lr_max=float(cfg.trainer.lr),
                pct_start=float(cfg.trainer.pct_start),
                cbs=[report, *averaged, *measured, *(cbs or [])],
            )
        result.train_seconds, result.train_images = report.train_seconds, report.train_images
        result.noise_seconds = noise.seconds if noise is not None else 0.0
        last = result.history[-1]
        result.valid = {k: v for k, v in last.items() if k.startswith("val/")}
    else:
        result.valid = evaluate(learn, 1, "val")
    if test:
        result.test = test_metrics(learn, int(cfg.trainer.test_views), dataset.num_classes)
    result.seconds = time.perf_counter() - start
    result.peak_memory = memory.peak_bytes(learn.dls.device)
    return result
