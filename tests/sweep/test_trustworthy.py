"""What a sweep tells the sampler and the user must not mislead: batch-size
records on every end state, memory of a failed attempt freed before the retry, long runs not
pruned for being long, no test metric before the final model, cmaes in the pinned set."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from fastai.callback.core import Callback
from omegaconf import DictConfig

from kmnist_sweep.data.datasets import load_dataset
from kmnist_sweep.sweep.objective import make_objective
from kmnist_sweep.sweep.progress import describe_trial
from kmnist_sweep.sweep.study import (
    build_pruner,
    epochs_searched_up_to,
    grid_steps,
    open_sweep_study,
)
from kmnist_sweep.train import batch_size, engine
from tests.conftest import run_cli

optuna.logging.set_verbosity(optuna.logging.WARNING)
REPO = Path(__file__).resolve().parents[2]


def _cfg(compose_cfg: Callable[..., DictConfig], tmp_path: Path, *extra: str) -> DictConfig:
    return compose_cfg(
        "data=synthetic",
        "tracking=disabled",
        f"study.output_dir={tmp_path}",
        *extra,
    )


def _finished_trial(study: optuna.Study, values: dict[int, float], params: dict[str, Any]) -> None:
    distributions = {
        "trainer.batch_size.log2": optuna.distributions.IntDistribution(7, 7),
        "trainer.epochs": optuna.distributions.IntDistribution(1, 30),
    }
    study.add_trial(
        optuna.trial.create_trial(
            params=params,
            distributions={k: distributions[k] for k in params},
            value=max(values.values()),
            intermediate_values=values,
        )
    )


def test_a_trial_that_halved_and_was_pruned_keeps_its_batch_record(
    compose_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    """A real OOM inside the model's forward pass halves 128 -> 64; the pruner then stops the
    trial for its metric. Its record holds the effective size and the halving, and it is
    feasible for the sampler (it fitted at 64)."""
    cfg = _cfg(
        compose_cfg,
        tmp_path,
        "trainer.epochs=3",
        "data.n_train=512",
        "+search_space={trainer.batch_size: {type: pow2, low: 128, high: 128}}",
        "debug.inject_oom={above: 64, epoch: 1, step: 2}",
    )
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    for _ in range(3):  # three finished trials far better than any real one at every epoch
        _finished_trial(study, {1: 2.0, 2: 2.0, 3: 2.0}, {"trainer.batch_size.log2": 7})
    study.optimize(make_objective(cfg), n_trials=1)
    trial = study.trials[-1]
    assert trial.state == optuna.trial.TrialState.PRUNED
    attrs = trial.user_attrs
    assert attrs["batch_size/requested"] == 128 and attrs["batch_size/effective"] == 64
    assert attrs["batch_size/fitted"] is True
    (halving,) = attrs["batch_size/halvings"]
    assert (halving["from_bs"], halving["to_bs"], halving["cause"]) == (128, 64, "oom")
    assert "epoch 1 step 2" in halving["detail"]
    assert attrs["reason"] == "pruned at epoch 1"  # of the retry at 64
    assert make_objective(cfg).constraint(trial)[0] <= 0


class _Watch(Callback):
    """Before each attempt's first step: were the earlier attempts' models freed, and is
    autocast off? Held outside the attempts, so it must not itself keep a Learner alive."""

    order = -10

    def __init__(self, models: list[weakref.ref[torch.nn.Module]], seen: list[Any]) -> None:
        self.models, self.seen = models, seen

    def before_fit(self) -> None:
        self.first = True

    def before_batch(self) -> None:
        if self.first and self.training:
            self.first = False
            alive = [ref() is not None for ref in self.models]
            self.seen.append((alive, torch.is_autocast_enabled("cpu")))
            self.models.append(weakref.ref(self.learn.model))


def test_the_failed_attempt_is_freed_before_the_retry_starts(
    compose_cfg: Callable[..., DictConfig],
) -> None:
    cfg = compose_cfg(
        "data=synthetic",
        "data.n_train=512",
        "trainer.epochs=1",
        "debug.inject_oom={above: 64, epoch: 1, step: 2}",
    )
    data = load_dataset(cfg.data)
    models: list[weakref.ref[torch.nn.Module]] = []
    seen: list[Any] = []
    watch = _Watch(models, seen)

    def run(bs: int) -> engine.TrainResult:
        learn = engine.build_learner(cfg, data, batch_size=bs)
        # bf16 autocast as on a GPU (emulated on a CPU without it): the OOM inside the
        # forward pass leaves its region entered, and it must not reach the retry.
        learn.add_cb(engine.Autocast("cpu"))
        return engine.train(
            cfg, data, learn=learn, quiet=True, cbs=[watch, *batch_size.guards(cfg)]
        )

    record = batch_size.Fallback(128)
    batch_size.fit_with_fallback(run, record, 16)
    assert [h.to_bs for h in record.halvings] == [64]
    # First attempt: nothing before it. The retry: the first attempt's model is dead, and
    # autocast (which the OOM left entered inside the forward pass) is closed.
    assert seen == [([], False), ([False], False)]


@pytest.mark.slow
def test_long_runs_are_not_pruned_by_the_end_of_short_runs(
    compose_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    """Three 2-epoch trials, then a 10-epoch one, in one study with a median pruner. Each
    reports at the percent of its own one-cycle schedule done, so the long run is compared
    with the short ones at the same fraction (its epoch 5 with their epoch 1), not at its
    epoch 2 with their annealed end. (Whether the by-epoch comparison would cut it depends
    on the data: on this easy set every schedule ends at accuracy 1.0.)"""
    cfg = _cfg(
        compose_cfg,
        tmp_path,
        "data.n_train=256",
        "trainer.batch_size=64",
        "+search_space={trainer.epochs: {type: int, low: 1, high: 30}}",
    )
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    for epochs in (2, 2, 2, 10):
        study.enqueue_trial({"trainer.epochs": epochs})
    study.optimize(make_objective(cfg), n_trials=4)
    short, long = study.trials[:3], study.trials[3]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in short)
    assert all(sorted(t.intermediate_values) == [50, 100] for t in short)
    assert long.state == optuna.trial.TrialState.COMPLETE, long.user_attrs.get("reason")
    assert sorted(long.intermediate_values) == list(range(10, 101, 10))


@pytest.mark.parametrize(
    ("n_min_trials", "steps"),
    [(1, [10]), (2, [10, 20]), (3, list(range(10, 101, 10)))],
)
@pytest.mark.slow
def test_the_median_needs_n_min_trials_finished_trials_at_a_step(
    compose_cfg: Callable[..., DictConfig],
    tmp_path: Path,
    n_min_trials: int,
    steps: list[int],
) -> None:
    """A 12-epoch trial after a finished 10-epoch and a finished 6-epoch trial, both far
    ahead. Steps are the percent of each schedule done, on a 10% grid: the 10-epoch trial
    reported at 10, 20, ..., the 6-epoch one at 20, 30, 50, 70, 80, 100. With
    `study.pruner.n_min_trials=1` (Optuna's default) the 10-epoch trial alone stops the run at
    step 10; with 2, the run goes on to step 20, the first both reached; with 3, two finished
    trials are never enough and it completes, reporting at every step of the grid."""
    cfg = _cfg(
        compose_cfg,
        tmp_path,
        "data.n_train=256",
        "trainer.batch_size=64",
        "study.pruner.n_startup_trials=1",
        "study.pruner.n_warmup_steps=1",
        f"study.pruner.n_min_trials={n_min_trials}",
        "+search_space={trainer.epochs: {type: int, low: 1, high: 30}}",
    )
    objective = make_objective(cfg)
    pruner = build_pruner(cfg.study.pruner, epochs_searched_up_to(objective.params))
    study = optuna.create_study(direction="maximize", pruner=pruner)
    ahead = {"10": range(10, 101, 10), "6": [20, 30, 50, 70, 80, 100]}
    for epochs, reported in ahead.items():
        _finished_trial(study, dict.fromkeys(reported, 2.0), {"trainer.epochs": int(epochs)})
    study.enqueue_trial({"trainer.epochs": 12})
    study.optimize(objective, n_trials=1)
    trial = study.trials[-1]
    complete = steps[-1] == 100
    expected = optuna.trial.TrialState.COMPLETE if complete else optuna.trial.TrialState.PRUNED
    assert trial.state == expected, trial.user_attrs.get("reason")
    assert sorted(trial.intermediate_values) == steps
    if not complete:  # the sweep's line names the epoch, and the step as a percent
        epoch = steps[-1] * 12 // 100
        where = f"pruned at epoch {epoch} ({steps[-1]}% of its schedule): val/acc="
        assert where in describe_trial(trial, ["val/acc"])


@pytest.mark.parametrize(("pruner", "state"), [("median", "PRUNED"), ("percentile", "COMPLETE")])
def test_a_percentile_pruner_stops_only_the_bottom_of_the_jury(
    compose_cfg: Callable[..., DictConfig], tmp_path: Path, pruner: str, state: str
) -> None:
    """Three finished 10-epoch trials: two far ahead (2.0, an accuracy no run reaches), one
    far behind (-1.0). A new trial lies between them at every step, under the median (2.0)
    but above the 10th percentile (-0.4): `+sweep=full_cpu`'s `percentile: 90` lets it
    finish, where the median pruner stops it at its first judged epoch."""
    cfg = _cfg(
        compose_cfg,
        tmp_path,
        "+sweep=full_cpu",
        "data.n_train=256",
        "study.pruner.n_warmup_steps=1",
        f"study.pruner.type={pruner}",
        f"study.storage=sqlite:///{tmp_path / 'study.db'}",
    )
    assert cfg.study.pruner.percentile == 90.0 and cfg.study.pruner.n_min_trials == 3
    objective = make_objective(cfg)
    study = open_sweep_study(cfg.study, objective.params, 0, None)  # as a sweep's worker does
    for value in (2.0, 2.0, -1.0):
        _finished_trial(study, dict.fromkeys(range(10, 101, 10), value), {"trainer.epochs": 10})
    study.enqueue_trial({"trainer.epochs": 8})
    study.optimize(objective, n_trials=1)
    trial = study.trials[-1]
    assert trial.state == optuna.trial.TrialState[state], trial.user_attrs.get("reason")
    steps = sorted(trial.intermediate_values)
    assert steps[-1] == 100 if state == "COMPLETE" else steps == [10]


def test_each_grid_step_goes_to_the_nearest_epoch() -> None:
    """12 epochs: epochs 3 (25%) and 9 (75%) report nothing, as 4 (33%) and 10 (83%) are
    nearer to 30 and 80; a 30-epoch run reports every third epoch; exact percent off the grid."""
    assert grid_steps(12, 10) == {
        1: 10, 2: 20, 4: 30, 5: 40, 6: 50, 7: 60, 8: 70, 10: 80, 11: 90, 12: 100
    }  # fmt: skip
    assert grid_steps(30, 10) == {3 * k: 10 * k for k in range(1, 11)}
    assert grid_steps(2, 10) == {1: 50, 2: 100}
    assert grid_steps(7, 1) == {1: 14, 2: 29, 3: 43, 4: 57, 5: 71, 6: 86, 7: 100}


def test_the_budget_follows_the_searched_epochs() -> None:
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {"type": "hyperband", "min_resource": 1, "max_resource": 10, "reduction_factor": 3}
    )
    searched = build_pruner(cfg, longest_epochs=30)
    fixed = build_pruner(cfg)
    assert isinstance(searched, optuna.pruners.HyperbandPruner)
    assert searched._max_resource == 100 and searched._min_resource == 4  # percent
    assert isinstance(fixed, optuna.pruners.HyperbandPruner)
    assert fixed._max_resource == 10  # epochs, trainer.epochs when nothing is searched


@pytest.mark.slow
def test_successive_halving_meets_trials_at_the_same_share_of_their_schedules(
    tmp_path: Path,
) -> None:
    """Schedules of 2, 3 and 4 epochs (a grid): each trial enters rung 0 with its value at
    half its schedule (epoch 1 of 2, 2 of 3 — the nearest, 2 of 4), never with the value of
    a report further on; and they report nowhere else before their end."""
    args = ["+sweep=epochs", "data=synthetic", "data.n_train=256", "data.image_size=16"]
    args += ["study.pruner.type=halving"]
    args += ["study.sampler.type=grid", "study.n_trials=3", "study.report=false"]
    args += ["++search_space.trainer.epochs.low=2", "++search_space.trainer.epochs.high=4"]
    out = run_cli(*args, "tracking=disabled", "study.workers=1", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    study = optuna.load_study(
        study_name="epochs-synthetic", storage=f"sqlite:///{tmp_path}/storage/epochs-synthetic.db"
    )
    assert sorted(t.params["trainer.epochs"] for t in study.trials) == [2, 3, 4]
    for t in study.trials:
        assert set(t.intermediate_values) <= {50, 100} and 50 in t.intermediate_values, t.number
        assert t.system_attrs["completed_rung_0"] == t.intermediate_values[50], t.number
    # A schedule of one epoch has no share before its end: no rung to meet at.
    short = run_cli("+sweep=full", "data=synthetic", "study.pruner.type=halving", cwd=tmp_path)
    assert short.returncode == 2 and short.stderr.strip().endswith(
        "search_space.trainer.epochs starts at 1: a schedule that short has no share but its "
        "end; search epochs from 2, or use the median pruner"
    ), short.stderr


# That a batch-size sweep stores no test metric is checked on test_cli's sweep
# (assert_no_test_metric): the same command, run once.


@pytest.mark.slow
def test_cmaes_runs_a_three_trial_sweep(tmp_path: Path) -> None:
    args = [
        "+sweep=full",
        "data=synthetic",
        "study.sampler.type=cmaes",
        "study.n_trials=3",
        "++search_space.trainer.epochs.high=2",
        "++search_space.model.arch.choices=[resnet18]",
        "++search_space.model.stem.choices=[imagenet]",  # the small stem: ~16x the work
        "++search_space.trainer.batch_size.high=64",
        "tracking=disabled",
    ]
    done = run_cli(*args, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "3 complete" in done.stdout or "of 3;" in done.stdout, done.stdout[-500:]


def test_trainer_momentum_reaches_sgd(compose_cfg: Callable[..., DictConfig]) -> None:
    for momentum in (0.0, 0.5):
        cfg = compose_cfg(
            "data=synthetic",
            "data.n_train=128",
            "trainer.epochs=1",
            "trainer.optimizer=sgd",
            f"trainer.momentum={momentum}",
        )
        data = load_dataset(cfg.data)
        result = engine.train(cfg, data, quiet=True)
        assert result.learner is not None
        group = result.learner.opt.opt.param_groups[0]
        assert group["momentum"] == pytest.approx(momentum)  # the schedule's end value
