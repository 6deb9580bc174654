"""The weight average (`trainer.ema`, train/ema.py) through `engine.train`, the path of the
single run, every trial and `final`: what validation scores, what training steps and what
the model holds at the end, against the average computed here from the live weights."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from fastai.callback.core import Callback
from omegaconf import DictConfig

from kmnist_sweep.data.datasets import load_dataset
from kmnist_sweep.train import engine
from kmnist_sweep.train.ema import UPDATE_EVERY, WeightAverage

# Batch 48: 9 steps an epoch, so an epoch ends between two of the average's moves.
FAST = ("data=synthetic", "trainer.batch_size=48", "trainer.eval_batch_size=256")


def watched(model: torch.nn.Module) -> list[torch.Tensor]:
    """Weights of the head and of a (channels-last) convolution, and a batch-norm running
    statistic: the average covers all three."""
    state = model.state_dict()
    names = ("fc.weight", "layer1.0.conv1.weight", "bn1.running_mean")
    return [state[name].clone() for name in names]


class Spy(Callback):
    """Runs after WeightAverage (order 5) at every event and records what the model holds."""

    order = 6

    def before_fit(self) -> None:
        self.start = watched(self.learn.model)
        self.live: list[list[torch.Tensor]] = []  # after each optimiser step
        self.validated: list[list[torch.Tensor]] = []  # when validation starts
        self.trained_from: list[list[torch.Tensor]] = []  # when each training phase starts

    def before_train(self) -> None:
        self.trained_from.append(watched(self.learn.model))

    def after_step(self) -> None:
        self.live.append(watched(self.learn.model))

    def before_validate(self) -> None:
        self.validated.append(watched(self.learn.model))


def averages(
    start: list[torch.Tensor], live: list[list[torch.Tensor]], ema: float, per_epoch: int
) -> list:
    """The average after each step: it moves towards the live weights after UPDATE_EVERY
    steps and at an epoch's end, with the decay min(ema, (1 + n) / (10 + n)) of step n
    raised to the number of steps since it last moved."""
    average, out, pending = [t.clone() for t in start], [], 0
    for n, weights in enumerate(live, start=1):
        pending += 1
        if pending == UPDATE_EVERY or n % per_epoch == 0:
            decay = min(ema, (1 + n) / (10 + n)) ** pending
            average = [decay * a + (1 - decay) * w for a, w in zip(average, weights, strict=True)]
            pending = 0
        out.append(average)
    return out


def close(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a, b, strict=True))


def run(compose_cfg: Callable[..., DictConfig], *overrides: str) -> tuple[Spy, list, int]:
    cfg = compose_cfg(*FAST, "trainer.epochs=3", *overrides)
    spy = Spy()
    result = engine.train(cfg, load_dataset(cfg.data), cbs=[spy])
    assert result.learner is not None
    return spy, watched(result.learner.model), len(result.learner.dls.train)


def test_validation_scores_the_average_before_the_last_epoch_training_the_live_weights(
    compose_cfg: Callable[..., DictConfig],
) -> None:
    assert float(compose_cfg(*FAST).trainer.ema) == 0.99  # the shipped default
    spy, final, steps = run(compose_cfg)
    assert len(spy.live) == 3 * steps and len(spy.validated) == 3
    assert steps % UPDATE_EVERY  # an epoch ends between two moves of the average
    expected = averages(spy.start, spy.live, 0.99, steps)
    for epoch in (0, 1):
        last = (epoch + 1) * steps - 1  # the epoch's last optimiser step
        assert close(spy.validated[epoch], expected[last])
        assert not close(spy.validated[epoch], spy.live[last])
        # The next epoch trains on from the live weights, not from the average.
        assert close(spy.trained_from[epoch + 1], spy.live[last])
    # The last epoch validates, and the run ends with, the trained weights.
    assert close(spy.validated[2], spy.live[-1]) and close(final, spy.live[-1])
    assert not close(final, expected[-1])


@pytest.mark.slow
def test_the_average_changes_no_trained_weight(compose_cfg: Callable[..., DictConfig]) -> None:
    """Training never reads the average: ema=0 ends on the very same weights."""
    _, averaged, _ = run(compose_cfg)
    spy, plain, steps = run(compose_cfg, "trainer.ema=0")
    assert all(torch.equal(a, b) for a, b in zip(averaged, plain, strict=True))
    assert all(close(v, spy.live[(e + 1) * steps - 1]) for e, v in enumerate(spy.validated))


def test_a_decay_outside_zero_to_one_is_refused() -> None:
    for ema in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match=r"must lie in \(0, 1\)"):
            WeightAverage(ema)
