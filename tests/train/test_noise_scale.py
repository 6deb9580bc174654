"""The gradient noise scale (train/noise_scale.py) against the truth where it is known."""

from __future__ import annotations

import math
import random
from pathlib import Path

import optuna
import pytest
import torch
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.optimizer import SGD
from torch import nn

from kmnist_sweep import trial_attrs
from kmnist_sweep.train.noise_scale import (
    NOISE_SCALE_KEY,
    NoiseScale,
    estimate,
    pooled,
    summarise,
)
from tests.conftest import run_cli
from tests.results.test_tracking import history, offline_runs


@pytest.mark.parametrize("population", [None, 1000])
def test_estimate_inverts_the_expected_squared_norms(population: int | None) -> None:
    """Fed the expected squared norms at two batch sizes, the estimator returns the |G|²
    and tr(Σ) they came from, with and without a finite population."""
    grad_sq, trace = 0.3, 12.0

    def expected(batch: int) -> float:
        shrink = 1.0 if population is None else (population - batch) / (population - 1)
        return grad_sq + trace / batch * shrink

    got = estimate(expected(16), expected(64), 16, 64, population)
    assert got == pytest.approx((grad_sq, trace), rel=1e-9)


def test_summarise_takes_the_median_of_the_last_defined_epochs() -> None:
    assert summarise([1000.0, None, 30.0, 50.0, 40.0], last=3) == 40.0
    assert summarise([10.0, None], last=1) is None
    assert summarise([]) is None


def logistic_problem(n: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, nn.Linear]:
    """Labels drawn from a logistic model, and a two-class linear model half-way from zero
    to that model's weights, where the gradient is small beside its noise."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=gen)
    w_true = torch.randn(dim, generator=gen)
    y = (torch.rand(n, generator=gen) < torch.sigmoid(x @ w_true)).long()
    model = nn.Linear(dim, 2)
    with torch.no_grad():
        model.weight.copy_(torch.stack([torch.zeros(dim), 0.5 * w_true]))
        model.bias.zero_()
    return x, y, model


def true_noise_scale(x: torch.Tensor, y: torch.Tensor, model: nn.Linear) -> float:
    """tr(Σ)/|G|² from every image's own gradient of the mean cross-entropy: for softmax
    regression, d loss/d logits = p - onehot(y); the weights' gradient is its outer product
    with x, the bias's is itself."""
    with torch.no_grad():
        dlogits = torch.softmax(model(x), -1) - nn.functional.one_hot(y, 2).float()
    per_image = torch.cat([(dlogits[:, :, None] * x[:, None, :]).flatten(1), dlogits], 1)
    mean = per_image.mean(0)
    trace = ((per_image - mean) ** 2).sum(1).mean()  # Σ: the covariance of one drawn image
    return float(trace / (mean**2).sum())


def test_noise_scale_of_logistic_regression_is_within_a_fifth_of_the_truth() -> None:
    """The callback, in a fastai fit at LR 0 (the weights, and so the truth, stay put),
    measures every step at batch 256 (and its first 64 images) over 10 epochs. A biased
    estimator fails here: taking the batch's |G_B|² for |G|² gives about 0.6 of the truth,
    and the ratio of a single step's estimates is undefined on many steps."""
    x, y, model = logistic_problem(4096, 8)
    truth = true_noise_scale(x, y, model)
    assert 100 < truth < 400  # comparable to the batch: the noise term matters
    pairs = list(zip(x, y, strict=True))
    random.seed(0)  # fastai's shuffle
    torch.manual_seed(0)
    dls = DataLoaders.from_dsets(pairs, pairs[:256], bs=256, shuffle=True, device="cpu")
    cb = NoiseScale(every=1)
    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), opt_func=SGD, cbs=[cb])
    learn.fit(10, lr=0.0)

    assert len(cb.values) == 10
    assert all(v is not None and math.isfinite(v) and v > 0 for v in cb.values), cb.values
    measured = pooled(cb.parts)
    assert measured is not None
    assert measured == pytest.approx(truth, rel=0.2), (measured, truth, cb.values)


@pytest.mark.slow  # under a minute, but two trials and two wandb runs through the CLI
def test_a_batch_size_sweep_records_the_noise_scale_of_every_epoch(tmp_path: Path) -> None:
    """Through the CLI: each trial of a small batch-size sweep stores a finite, positive
    B_simple for each of its epochs, and its wandb run logs it per epoch. The LR is fixed
    at one that trains smoothly (no range test): where the loss jumps about, the noise can
    swamp the gradient and an epoch's value is rightly undefined."""
    epochs = 2
    out = run_cli(
        "+sweep=batchsize",
        "data=synthetic",
        "data.image_size=16",
        f"trainer.epochs={epochs}",
        "batch_size.min_steps=0",  # every size trains `epochs` epochs
        "study.n_trials=2",
        "study.report=false",
        "++search_space.trainer.batch_size.high=64",
        "++search_space.trainer.lr={type: categorical, choices: [0.01]}",
        cwd=tmp_path,
        env={"WANDB_MODE": "offline", "PYTHONWARNINGS": ""},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    storage = f"sqlite:///{tmp_path / 'storage' / 'batchsize-synthetic.db'}"
    study = optuna.load_study(study_name="batchsize-synthetic", storage=storage)
    trials = study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    assert len(trials) == 2
    for trial in trials:
        values = trial.user_attrs[trial_attrs.NOISE_SCALE]
        assert len(values) == epochs, values
        assert all(v is not None and math.isfinite(v) and v > 0 for v in values), values

    runs = offline_runs(tmp_path / "sweeps" / "batchsize-synthetic")
    assert len(runs) == 2
    for records in runs.values():
        logged = [row[NOISE_SCALE_KEY] for row in history(records) if NOISE_SCALE_KEY in row]
        assert len(logged) == epochs and all(v > 0 for v in logged), logged
