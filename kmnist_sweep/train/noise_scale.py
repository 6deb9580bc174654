"""The gradient noise scale B_simple = tr(Σ)/|G|², in images, measured while a model trains
(McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", appendix A).

G is the gradient of the loss over the whole training split and Σ the covariance of one
image's gradient. A batch of B images gives a gradient whose squared norm is |G|² plus
tr(Σ)/B on average, so the squared norms at two batch sizes give unbiased estimates of
both (`estimate`). Their ratio is the batch size at which the noise in a step equals its
signal: the critical batch size, above which a larger batch buys few fewer steps.

Both sizes come from one training batch: the gradient of the loss on its first B/k images
(one extra backward pass through the batch's graph), and the training gradient itself.
Taking the small one through the full batch's graph keeps batch norm's statistics those of
the batch the model trains on, and the step and the weights untouched. The estimates are
noisy and a ratio of noisy estimates is biased, so numerator and denominator are summed
over each epoch's measured steps before dividing (`NoiseScale.values`, one per epoch).

    cb = NoiseScale(every=8)            # a fastai Callback: learn.fit(..., cbs=[cb])
    cb.values                           # B_simple per epoch (None where undefined)
    summarise(cb.values)                # one number for the run
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from typing import TypeVar

import torch
from fastai.callback.core import Callback

NOISE_SCALE_KEY = "train/noise_scale"  # the per-epoch metric: B_simple, images
SPLIT = 4  # the small batch is the first 1/SPLIT of the training batch
LEAST = 4  # measured steps per epoch at the least, where the epoch has that many

Norm = TypeVar("Norm", float, torch.Tensor)  # a squared norm, as a number or on the device


def estimate(
    small_sq: Norm,
    big_sq: Norm,
    b_small: int,
    b_big: int,
    population: int | None = None,
) -> tuple[Norm, Norm]:
    """(|G|², tr(Σ)) from the squared gradient norms of a batch of `b_small` images and of
    one of `b_big`, each unbiased. `population`: images the batches are drawn from without
    replacement (an epoch's shuffle), whose finite size shrinks a batch's variance by
    (N - B)/(N - 1); None treats it as infinite."""
    if not 0 < b_small < b_big:
        raise ValueError(f"need 0 < b_small < b_big, got {b_small} and {b_big}")
    small_c, big_c = _variance_factor(b_small, population), _variance_factor(b_big, population)
    trace = (small_sq - big_sq) / (small_c - big_c)
    return big_sq - big_c * trace, trace


def _variance_factor(batch: int, population: int | None) -> float:
    """Variance of a batch's mean gradient, in units of one image's variance."""
    if population is None or population <= 1:
        return 1 / batch
    return (population - batch) / ((population - 1) * batch)


def noise_scale(grad_sq: float, trace: float) -> float | None:
    """B_simple in images, None where the (summed) estimates do not define one: the noise
    swamps the signal (|G|² <= 0) or the variance estimate is not positive."""
    if not (grad_sq > 0 and trace > 0 and math.isfinite(grad_sq) and math.isfinite(trace)):
        return None
    return trace / grad_sq


def pooled(parts: Sequence[tuple[float, float]]) -> float | None:
    """B_simple over several epochs' summed (|G|², tr(Σ)): their sums' ratio."""
    return noise_scale(sum(p[0] for p in parts), sum(p[1] for p in parts))


def summarise(values: Sequence[float | None], last: int = 2) -> float | None:
    """One noise scale for a run: the median of the defined values among its last `last`
    epochs, where the loss is nearest the one a target asks for. None if none is defined."""
    tail = [v for v in values[-last:] if v is not None and math.isfinite(v) and v > 0]
    return statistics.median(tail) if tail else None


class NoiseScale(Callback):
    """Measures on every `every`-th optimiser step of an epoch, from its first, and on at
    least `least` steps of an epoch that has them (a large batch has few steps per epoch).

    Its own seconds are kept apart (`seconds`): the training time and speed that the engine
    reports leave them out, so a size measured more often does not look slower. The loss
    must be a mean over the batch (fastai's and torch's default): the small batch's loss is
    then the loss function on the first 1/SPLIT of the batch."""

    order = 60  # after Autocast has made the predictions fp32

    def __init__(self, every: int, least: int = LEAST, population: int | None = None) -> None:
        if every < 1:
            raise ValueError(f"every={every} must be at least 1")
        self.every, self.least = every, least
        self.population = population  # None: the training loader's size
        self.values: list[float | None] = []
        self.parts: list[tuple[float, float]] = []  # (|G|², tr(Σ)) summed over each epoch
        self.seconds = 0.0  # spent measuring, all epochs

    def before_fit(self) -> None:
        self.values, self.parts, self.seconds = [], [], 0.0
        self.params = [p for p in self.learn.model.parameters() if p.requires_grad]
        self.device = self.params[0].device if self.params else torch.device("cpu")

    def before_epoch(self) -> None:
        # Summed on the device: reading a value would wait for the GPU at every measurement.
        self.grad_sq = torch.zeros((), device=self.device)
        self.trace = torch.zeros((), device=self.device)
        self.small_sq: torch.Tensor | None = None

    def before_backward(self) -> None:
        self.small_sq = None
        learn = self.learn
        big = _batch_size(learn.yb)
        small = big // SPLIT
        interval = max(1, min(self.every, int(learn.n_iter) // self.least))
        if learn.iter % interval or small < 1 or not self.params:
            return
        started = self._clock()
        loss = learn.loss_func(learn.pred[:small], *(y[:small] for y in learn.yb))
        grads = torch.autograd.grad(loss, self.params, retain_graph=True, allow_unused=True)
        self.small_sq = _squared_norm([g for g in grads if g is not None])
        self.sizes = (small, big)
        self.seconds += self._clock() - started

    def after_backward(self) -> None:
        if self.small_sq is None:
            return
        started = self._clock()
        big_sq = _squared_norm([p.grad for p in self.params if p.grad is not None])
        population = self.population or int(getattr(self.learn.dls.train, "n", 0)) or None
        grad_sq, trace = estimate(self.small_sq, big_sq, *self.sizes, population)
        self.grad_sq += grad_sq
        self.trace += trace
        self.small_sq = None
        self.seconds += self._clock() - started

    def after_train(self) -> None:
        self.parts.append((float(self.grad_sq), float(self.trace)))
        self.values.append(noise_scale(*self.parts[-1]))

    def _clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the GPU's work so far belongs to training
        return time.perf_counter()


def _batch_size(yb: Sequence[torch.Tensor]) -> int:
    return int(yb[0].shape[0]) if len(yb) else 0


def _squared_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    if not tensors:
        return torch.zeros(())
    norms = torch._foreach_norm([t.float() for t in tensors])
    return torch.stack(norms).square().sum()
