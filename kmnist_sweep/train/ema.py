"""An exponential moving average of the weights (`trainer.ema`): what validation scores at
every epoch but the last.

While one-cycle's LR is high the weights jump from step to step and a snapshot of them
scores low; their running average sits nearer the valley they circle. Measured on
kmnist_sample (the defaults, 2,000 held-out images, docs/benchmarks.md part 2): after 3 of
10 epochs the average scores 0.9625 where the weights score 0.936. Trials are judged at
every epoch, so the pruner sees nearer what a run will end at, and a single run passes a
given accuracy epochs sooner.

By the last epoch the LR has annealed to almost nothing and the average has nothing left
to smooth: left as the final model it scored 1-4 images of 2,000 lower than the weights on
each of 3 seeds (docs/benchmarks.md, "The default recipe"). So the last epoch validates the
trained weights, and they are the model a run ends with: training never reads the average,
and a run's final weights are the same with it or without it (tests/test_ema.py).

The decay after n optimiser steps is min(trainer.ema, (1 + n) / (10 + n)), the warm-up of
TensorFlow's ExponentialMovingAverage: early on the average forgets its random start fast.
Batch-norm running statistics are averaged like the weights.

The average moves every UPDATE_EVERY optimiser steps, by that many steps' decay at once.
An update reads and writes three copies of the model (45 MB each for resnet18) and during
training they are out of cache: updated at every step it cost ~11 ms of a ~140 ms step on
an Intel Xeon (the tool 7% below the bare loop, benchmarks/engine.py part 1), where the
same update alone, in cache, takes 1.8 ms (part 4). Every 4th step keeps 25 samples of the
~100-step window a decay of 0.99 averages over.
"""

from __future__ import annotations

import torch
from fastai.callback.core import Callback

UPDATE_EVERY = 4  # optimiser steps between two updates of the average


def decay_at(step: int, ema: float) -> float:
    """Fraction of the average kept at optimiser step `step` (1, 2, ...)."""
    return min(ema, (1 + step) / (10 + step))


class WeightAverage(Callback):
    """Keeps the average beside the model's floating-point weights and buffers (not
    batch-norm's step counter) and swaps it in for validation before the last epoch."""

    order = 5  # before the epoch's metrics are recorded

    def __init__(self, ema: float) -> None:
        if not 0 < ema < 1:
            raise ValueError(f"ema={ema} must lie in (0, 1)")
        self.ema = ema

    def before_fit(self) -> None:
        state = self.learn.model.state_dict()  # detached views of the live tensors
        self.live = [t for t in state.values() if t.is_floating_point()]
        self.average = [t.clone() for t in self.live]
        self.held = [t.clone() for t in self.live]  # the live weights while validation runs
        self.steps = 0
        self.swapped = False  # the average is in the model and the live weights in `held`

    @torch.no_grad()
    def after_step(self) -> None:
        self.steps += 1
        if self.steps % UPDATE_EVERY == 0:
            decay = decay_at(self.steps, self.ema) ** UPDATE_EVERY
            torch._foreach_lerp_(self.average, self.live, 1 - decay)

    @torch.no_grad()
    def before_validate(self) -> None:
        if self.learn.epoch + 1 < self.learn.n_epoch:
            torch._foreach_copy_(self.held, self.live)
            torch._foreach_copy_(self.live, self.average)
            self.swapped = True

    @torch.no_grad()
    def after_validate(self) -> None:
        # fastai calls this even when an earlier callback cancelled before_validate: only a
        # swap that happened is undone, or stale weights would overwrite the live ones.
        if self.swapped:
            torch._foreach_copy_(self.live, self.held)
            self.swapped = False

    def after_fit(self) -> None:
        self.average, self.held = [], []  # two copies of the model less once training ends
