"""Batch sizes are powers of two; a run that runs out of memory or diverges halves its batch.

The article picks the batch by starting large and halving while the run does not fit or
the loss is not trending down. Sweep tools mark such a trial failed, so the sampler learns
nothing; here the trial goes on at the halved batch and records why. Only real failures
halve: out of memory, and a loss that is not finite or explodes above its start. A flat
loss is what one-cycle's warm-up (a 25th of the peak LR) looks like at first, and a large
batch may take only a few steps per epoch: whether a run learned is judged once it has
trained, on its validation accuracy against chance (`learning_verdict`), and a run that did
not is kept and named so, never halved or counted as fitted.

On a halving the *run* restarts (fresh weights, optimiser and one-cycle schedule) rather
than the epoch: the one-cycle schedule and AdamW's state are laid out for the old number
of steps, so resuming mid-way would train a schedule that no config describes, and
`best.yaml` could not reproduce the trial.
"""

from __future__ import annotations

import gc
import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from fastai.callback.core import Callback
from omegaconf import DictConfig
from torch import nn

from kmnist_sweep import trial_attrs
from kmnist_sweep.errors import error_line

log = logging.getLogger(__name__)

T = TypeVar("T")


class Diverged(RuntimeError):
    """The training loss is not finite, or explodes above its start."""


class BatchSizeExhausted(RuntimeError):
    """Halving reached below batch_size.min; the message says what kept failing."""


@dataclass
class Halving:
    from_bs: int  # images per step before
    to_bs: int  # images per step after
    cause: str  # "oom" or "diverged"
    detail: str  # where and why, one line
    left_allocated: int = 0  # bytes the failed attempt still held on CUDA once freed (0 on CPU)


@dataclass
class Fallback:
    """What happened to a trial's batch size, whatever the trial's end (complete, pruned by
    the pruner, failed): the objective writes it as trial attributes in every case."""

    requested: int  # images per step asked for
    effective: int = 0  # images per step of the attempt that counted (the last one)
    fitted: bool = True  # False: even batch_size.min ran out of memory or diverged
    halvings: list[Halving] = field(default_factory=list)

    def as_attrs(self) -> dict[str, Any]:
        return {
            trial_attrs.BATCH_REQUESTED: self.requested,
            trial_attrs.BATCH_EFFECTIVE: self.effective,
            trial_attrs.BATCH_FITTED: self.fitted,
            trial_attrs.BATCH_HALVINGS: [vars(h) for h in self.halvings],
        }


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    # Some back-ends (MPS, older CUDA paths) raise a plain RuntimeError.
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def allocated() -> int:
    """Bytes of tensors alive on the current CUDA device; 0 without CUDA."""
    return int(torch.cuda.memory_allocated()) if torch.cuda.is_available() else 0


def free_memory() -> None:
    """Drop what a failed attempt held. Call it outside any `except` block: while an
    exception is being handled, its traceback keeps the attempt's frames (the Learner, the
    model, the optimiser state, the activations) alive."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class _Failure:
    cause: str  # "oom" or "diverged"
    detail: str  # the error's message, one line


def _attempt(run: Callable[[int], T], bs: int, record: Fallback) -> T | _Failure:
    """`run(bs)`; an OOM or divergence comes back as a _Failure with nothing of the attempt
    left referenced; any other error (a prune too) propagates with `record` at this batch."""
    record.effective = bs
    try:
        return run(bs)
    except Exception as exc:
        if is_oom(exc):
            cause = "oom"
        elif isinstance(exc, Diverged):
            cause = "diverged"
        else:
            raise
        # fastai prefixes a callback's error with "Exception occured in ...:", so the
        # original message is the last line.
        return _Failure(cause, error_line(exc, typed=False, last=True))


def fit_with_fallback(
    run: Callable[[int], T],
    record: Fallback,
    minimum: int,
    on_halve: Callable[[Halving], None] | None = None,
) -> T:
    """Call `run(batch)` from `record.requested` down by halves until one attempt completes;
    `record` says what happened however the trial ends."""
    bs = record.requested
    while True:
        before = allocated()
        outcome = _attempt(run, bs, record)
        if not isinstance(outcome, _Failure):
            return outcome
        free_memory()  # here, not in the except block: the failed attempt is unreachable now
        left = max(allocated() - before, 0)
        if left:
            log.warning("the failed attempt at batch %d still holds %d bytes on CUDA", bs, left)
        if bs // 2 < minimum:
            record.fitted = False
            raise BatchSizeExhausted(
                f"{outcome.cause} at batch {bs} ({outcome.detail}); halving would go below "
                f"batch_size.min={minimum}"
            )
        halving = Halving(bs, bs // 2, outcome.cause, outcome.detail, left)
        record.halvings.append(halving)
        if on_halve is not None:
            on_halve(halving)
        bs //= 2


# ---------------------------------------------------------------- callbacks on the learner


class DivergenceGuard(Callback):
    """Stops a run whose loss is NaN/inf, or whose smoothed loss explodes above `factor`
    times its first value. A loss that stays flat is left alone (see the module's doc)."""

    order = 60  # after the Recorder has smoothed this batch's loss

    def __init__(self, factor: float) -> None:
        self.factor = factor  # smoothed loss above factor x its first value = diverged
        self.first: float | None = None

    def before_fit(self) -> None:
        self.first = None

    def after_batch(self) -> None:
        if not self.training:
            return
        loss = float(self.learn.loss.detach())
        where = f"epoch {self.learn.epoch + 1} step {self.learn.iter + 1}"
        if not math.isfinite(loss):
            raise Diverged(f"loss is {loss} at {where}")
        smooth = float(self.learn.recorder.smooth_loss.value)
        if self.first is None:
            self.first = smooth
        elif smooth > self.factor * self.first:
            raise Diverged(f"smoothed loss {smooth:.3g} > {self.factor}x its start at {where}")


def epochs_for(batch: int, n_train: int, cfg: DictConfig) -> int:
    """Epochs of a trial at `batch`: cfg.trainer.epochs, raised until the run takes
    cfg.batch_size.min_steps optimiser steps, but not above cfg.batch_size.max_epochs."""
    epochs = int(cfg.trainer.epochs)
    min_steps = int(cfg.batch_size.min_steps)
    if min_steps <= 0 or epochs == 0:  # 0 epochs: evaluate the untrained net, as asked
        return epochs
    per_epoch = max(math.ceil(n_train / batch), 1)
    needed = min(math.ceil(min_steps / per_epoch), int(cfg.batch_size.max_epochs))
    return max(epochs, needed)


def learning_verdict(accuracy: float, labels: torch.Tensor) -> str | None:
    """None when a trained run's validation `accuracy` is above chance; else why it did not
    learn, one line. Chance is the accuracy of always answering the largest class; "above"
    means by more than three binomial standard errors at chance on these images."""
    counts = torch.bincount(labels.flatten().long().cpu())
    n = int(counts.sum())
    if n == 0:
        return None
    chance = float(counts.max()) / n
    margin = 3 * math.sqrt(chance * (1 - chance) / n)
    if accuracy > chance + margin:
        return None
    return (
        f"did not learn: validation accuracy {accuracy:.4f} is not above chance "
        f"({chance:.4f}, the largest class of {n} images) by 3 standard errors ({margin:.4f})"
    )


class InjectOOM(Callback):
    """Fault injection: a real `torch.OutOfMemoryError` raised inside the model's forward
    pass (half-way through the network, activations alive, autocast open) at (epoch, step)
    above a batch size, so the fallback is exercised on machines without a GPU as a real
    OOM would hit it. With epoch or step None the step is drawn at random for every run
    (fault-matrix tests: OOM at random steps)."""

    order = 0

    def __init__(self, above: int, epoch: int | None, step: int | None) -> None:
        self.above = above  # images: batches larger than this "do not fit"
        self.epoch = epoch  # 1-based epoch of the failure (None: random)
        self.at_step = step  # 1-based step within that epoch (None: random)
        self.armed = False

    def before_fit(self) -> None:
        self.when = (self.epoch, self.at_step)
        if self.epoch is None or self.at_step is None:
            rng = random.Random()  # not the training RNGs: seeding them must stay unchanged
            epoch = self.epoch or rng.randint(1, max(int(self.learn.n_epoch), 1))
            step = self.at_step or rng.randint(1, max(len(self.learn.dls.train), 1))
            self.when = (epoch, step)
        blocks = list(self.learn.model.children())
        self.hook = blocks[len(blocks) // 2].register_forward_hook(self._forward_hook)

    def before_batch(self) -> None:
        epoch, step = self.when
        self.armed = (
            self.training
            and self.learn.dls.train.bs > self.above
            and self.learn.epoch + 1 == epoch
            and self.learn.iter + 1 == step
        )

    def after_fit(self) -> None:
        self.hook.remove()

    def _forward_hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if self.armed:
            self.armed = False
            epoch, step = self.when
            raise torch.OutOfMemoryError(
                f"injected out of memory at epoch {epoch} step {step} "
                f"(batch {self.learn.dls.train.bs} > {self.above})"
            )


def guards(cfg: DictConfig) -> list[Callback]:
    """The callbacks the config asks for on every training run (`debug.inject_oom`: tests)."""
    cbs: list[Callback] = [DivergenceGuard(float(cfg.batch_size.diverge_factor))]
    inject = cfg.debug.inject_oom
    if inject:
        epoch, step = inject.get("epoch"), inject.get("step")
        cbs.append(
            InjectOOM(
                int(inject.above),
                None if epoch is None else int(epoch),
                None if step is None else int(step),
            )
        )
    return cbs
