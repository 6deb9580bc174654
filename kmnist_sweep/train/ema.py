"""An exponential moving average of the weights (`trainer.ema`): what validation scores at
every epoch but the last.

While one-cycle's LR is high the weights jump from step to step, and their running average
sits nearer the valley they circle, so trials are judged nearer where they will end. By the
last epoch the LR has annealed and the average has nothing left to smooth: the last epoch
validates the trained weights, and they are the model a run keeps. Training never reads the
average (tests/train/test_ema.py).

The decay after n steps is min(trainer.ema, (1 + n) / (10 + n)), the warm-up of TensorFlow's
ExponentialMovingAverage: early on the average forgets its random start fast. Batch-norm
running statistics are averaged like the weights. An update reads and writes three copies of
the model, so the average moves every UPDATE_EVERY steps, by the decay of each step since the
last move, and once more before it is validated, so that it includes the epoch's last step.
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
        self.pending = 0  # optimiser steps since the average last moved
        self.swapped = False  # the average is in the model and the live weights in `held`

    @torch.no_grad()
    def after_step(self) -> None:
        self.steps += 1
        self.pending += 1
        if self.pending == UPDATE_EVERY:
            self.move()

    def move(self) -> None:
        """Move the average by the `pending` steps since its last move, each at its decay."""
        decay = decay_at(self.steps, self.ema) ** self.pending
        torch._foreach_lerp_(self.average, self.live, 1 - decay)
        self.pending = 0

    @torch.no_grad()
    def before_validate(self) -> None:
        if self.learn.epoch + 1 < self.learn.n_epoch:
            if self.pending:
                self.move()
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
