"""The objective on real (tiny) training: fallback, seeded LR, pruning, constraints."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
from omegaconf import DictConfig

from kmnist_sweep.config.search_space import parse_space
from kmnist_sweep.results.tracking import Tracker
from kmnist_sweep.sweep import lr_seed
from kmnist_sweep.sweep.objective import make_objective, suggest_params
from kmnist_sweep.sweep.study import batch_size_constraint
from kmnist_sweep.train import batch_size, lr_finder
from tests.conftest import run_cli
from tests.results.test_tracking import API_KEY, history, offline_runs

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _cfg(compose_cfg: Callable[..., DictConfig], tmp_path: Path, *extra: str) -> DictConfig:
    return compose_cfg(
        "data=synthetic",
        "tracking=disabled",
        f"study.output_dir={tmp_path}",
        "trainer.epochs=2",
        *extra,
    )


@pytest.mark.slow
def test_injected_oom_trial_completes_at_128_with_two_halvings(
    compose_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    cfg = _cfg(
        compose_cfg,
        tmp_path,
        "data.n_train=2304",  # 2,074 training images: 4 steps at batch 512, so step 3 exists
        "data.image_size=16",
        "+search_space={trainer.batch_size: {type: pow2, low: 512, high: 512}}",
        "debug.inject_oom={above: 128, epoch: 2, step: 3}",
    )
    study = optuna.create_study(direction="maximize")
    study.optimize(make_objective(cfg), n_trials=1)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE
    attrs = trial.user_attrs
    assert attrs["batch_size/requested"] == 512
    assert attrs["batch_size/effective"] == 128
    halvings = attrs["batch_size/halvings"]
    assert [(h["from_bs"], h["to_bs"], h["cause"]) for h in halvings] == [
        (512, 256, "oom"),
        (256, 128, "oom"),
    ]
    assert "trainer.batch_size=128" in attrs["overrides"]
    # Halved, but it trained: feasible for the sampler, judged by its value.
    assert attrs["batch_size/fitted"] is True
    assert batch_size_constraint(trial) == [0.0]
    assert (tmp_path / "trials" / "0" / "val_preds.npz").exists()


def test_huge_lr_halves_then_ends_with_a_reason(
    compose_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    cfg = _cfg(
        compose_cfg,
        tmp_path,
        "trainer.lr=1000",
        "batch_size.min=32",
        "+search_space={trainer.batch_size: {type: pow2, low: 64, high: 64}}",
    )
    study = optuna.create_study(direction="maximize")
    study.optimize(make_objective(cfg), n_trials=1)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED
    attrs = trial.user_attrs
    assert [(h["from_bs"], h["to_bs"], h["cause"]) for h in attrs["batch_size/halvings"]] == [
        (64, 32, "diverged")
    ]
    assert attrs["batch_size/effective"] == 32 and attrs["batch_size/fitted"] is False
    assert "diverged at batch 32" in attrs["reason"] and "batch_size.min=32" in attrs["reason"]
    assert batch_size_constraint(trial)[0] > 0


@pytest.mark.slow
def test_seeded_lr_runs_the_finder_once_and_searches_around_it(
    compose_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    cfg = _cfg(
        compose_cfg,
        tmp_path,
        "trainer.epochs=1",
        "lr_finder.num_it=20",
        # AdamW: at 10x SGD's `bottom` a one-epoch trial on 512 random images can diverge
        # and fail, and this test is about where the LRs come from, not about divergence.
        "trainer.optimizer=adamw",
        "+search_space={trainer.lr: {type: lr_finder, low_factor: 0.1, high_factor: 10}}",
    )
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"trainer.lr.factor": 1.0})
    study.optimize(make_objective(cfg), n_trials=3)
    cached = [k for k in study.user_attrs if k.startswith(lr_seed.CACHE_PREFIX)]
    assert len(cached) == 1, "one range test for one batch size"
    curve = lr_seed.read_curve(study.user_attrs[cached[0]], cfg)
    base = curve.suggestions[lr_finder.rule_for(cfg)]
    first = study.trials[0]
    assert first.params["trainer.lr.factor"] == 1.0
    assert first.user_attrs["lr/value"] == pytest.approx(base)
    for t in study.trials:
        assert 0.1 * base <= t.user_attrs["lr/value"] <= 10 * base
        assert f"trainer.lr={t.user_attrs['lr/value']!r}" in t.user_attrs["overrides"] or any(
            o.startswith("trainer.lr=") for o in t.user_attrs["overrides"]
        )
    assert list((tmp_path / "lr_finder").glob("*.png")), "the finder's plot is written"


def test_pow2_is_suggested_as_an_exponent(compose_cfg: Callable[..., DictConfig]) -> None:
    cfg = compose_cfg("+sweep=batchsize", "data=synthetic")
    params = parse_space(cfg.search_space, cfg)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    sizes = set()
    for _ in range(30):
        trial = study.ask()
        values = suggest_params(trial, params)
        sizes.add(values["trainer.batch_size"])
        assert "trainer.batch_size.log2" in trial.params
        study.tell(trial, 0.0)
    assert all(s & (s - 1) == 0 for s in sizes) and len(sizes) > 3


def _fake_fit(trial: optuna.Trial) -> float:
    """A trial whose requested batch above 128 'does not fit' at any size it may halve to
    (batch_size.min is the request itself), run through the real fallback."""
    exponent = trial.suggest_int("trainer.batch_size.log2", 5, 11)

    def run(bs: int) -> float:
        if bs > 128:
            raise batch_size.Diverged("too big")  # same path as an OOM
        return math.log2(bs) / 10

    record = batch_size.Fallback(2**exponent)
    try:
        value = batch_size.fit_with_fallback(run, record, 2**exponent)
    except batch_size.BatchSizeExhausted:
        value = 0.7  # as good a value as any: only the constraint can tell the sampler
    for key, attr in record.as_attrs().items():
        trial.set_user_attr(key, attr)
    return value


def _big_requests(constrained: bool, seed: int) -> int:
    """TPE given the constraint the objective hands the sweep's sampler (or none)."""
    sampler = optuna.samplers.TPESampler(
        seed=seed,
        n_startup_trials=10,
        constraints_func=batch_size_constraint if constrained else None,
    )
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.optimize(_fake_fit, n_trials=60)
    return sum(t.params["trainer.batch_size.log2"] > 7 for t in study.trials[10:])


def _ended(attrs: dict[str, object]) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, user_attrs=attrs)


def test_only_a_trial_that_fitted_at_no_batch_size_is_infeasible() -> None:
    assert batch_size_constraint(_ended({})) == [0.0]
    attrs: dict[str, object] = {"batch_size/requested": 256, "batch_size/effective": 256}
    assert batch_size_constraint(_ended(attrs)) == [0.0]
    attrs = {"batch_size/requested": 256, "batch_size/effective": 64, "batch_size/fitted": True}
    assert batch_size_constraint(_ended(attrs)) == [0.0]  # halved twice, then trained
    attrs = {"batch_size/requested": 256, "batch_size/effective": 16, "batch_size/fitted": False}
    assert batch_size_constraint(_ended(attrs))[0] > 8  # the larger the request, the further


@pytest.mark.slow
def test_constraints_make_infeasible_batch_sizes_rarer() -> None:
    # Proposals above 128 in trials 10-59 over three seeds, with and without constraints
    # (random proposals would put 4/7 of them above 128).
    with_c = sum(_big_requests(True, s) for s in range(3))
    without = sum(_big_requests(False, s) for s in range(3))
    print(f"requests above 128 after start-up: constrained {with_c}/150, plain {without}/150")
    assert with_c < 0.75 * without


def test_a_wandb_outage_mid_trial_leaves_the_trial_complete(
    compose_cfg: Callable[..., DictConfig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb.sdk.wandb_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = _cfg(
        compose_cfg,
        tmp_path,
        "tracking=offline",
        "+search_space={trainer.batch_size: {type: pow2, low: 64, high: 64}}",
    )
    calls = {"n": 0}

    def broken_log(self: object, *args: object, **kwargs: object) -> None:
        calls["n"] += 1
        raise ConnectionError("wandb is down")

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", broken_log)
    tracker = Tracker(cfg.tracking, "outage")
    study = optuna.create_study(direction="maximize")
    try:
        study.optimize(make_objective(cfg, tracker), n_trials=1)
    finally:
        tracker.close()
    assert calls["n"] >= 1, "the injected failure must have been hit"
    assert study.trials[0].state == optuna.trial.TrialState.COMPLETE
    assert len(study.trials[0].intermediate_values) == 2


@pytest.mark.slow
def test_a_run_restarted_at_a_halved_batch_is_judged_on_its_own_reports(tmp_path: Path) -> None:
    """Batch 64 runs out of memory in epoch 3, after reporting epochs 1 and 2; the run
    restarts at 32. The study must hold the restarted run's values (wandb logs every
    attempt's epochs, in order), and successive halving's rung 0 its epoch-1 value."""
    out = run_cli(
        "+sweep=batchsize",
        "data=synthetic",
        "trainer.epochs=3",
        "batch_size.min_steps=0",
        "study.n_trials=1",
        "study.pruner.type=halving",
        "study.report=false",
        "++search_space.trainer.batch_size.low=64",
        "++search_space.trainer.batch_size.high=64",
        "++search_space.trainer.lr=null",
        "debug.inject_oom={above: 32, epoch: 3, step: 1}",
        "tracking=offline",
        cwd=tmp_path,
        env={"WANDB_MODE": "offline", "WANDB_API_KEY": API_KEY},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    study = optuna.load_study(
        study_name="batchsize-synthetic",
        storage=f"sqlite:///{tmp_path}/storage/batchsize-synthetic.db",
    )
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE
    halvings = trial.user_attrs["batch_size/halvings"]
    assert [(h["from_bs"], h["to_bs"]) for h in halvings] == [(64, 32)]
    runs = offline_runs(tmp_path / "sweeps" / "batchsize-synthetic")
    rows = [row for row in history(runs["trial-0"]) if "val/acc" in row]
    assert [row["epoch"] for row in rows] == [1, 2, 1, 2, 3]  # attempt 1, then attempt 2
    restarted = {row["epoch"]: row["val/acc"] for row in rows[2:]}
    assert trial.intermediate_values == pytest.approx(restarted)
    assert trial.system_attrs["completed_rung_0"] == pytest.approx(restarted[1])
