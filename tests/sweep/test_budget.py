"""The budget planner (kmnist_sweep/sweep/budget.py): pure functions of what a study has
measured, driven here as a worker loop drives them, against a simulated clock."""

from __future__ import annotations

import dataclasses
import datetime
import time
from pathlib import Path

import optuna
import pytest
from omegaconf import OmegaConf
from optuna.trial import TrialState

from kmnist_sweep import trial_attrs
from kmnist_sweep.config.check import check_config
from kmnist_sweep.config.values import duration_s
from kmnist_sweep.errors import ConfigError
from kmnist_sweep.results.bundle import read_bundle
from kmnist_sweep.sweep import budgeted
from kmnist_sweep.sweep.budget import (
    Seen,
    answer_rung,
    choose,
    final_seconds,
    next_step,
    per_epoch,
    per_rung,
    per_train_epoch,
    plan,
    rung_epochs,
)
from kmnist_sweep.sweep.budgeted import Budget
from kmnist_sweep.sweep.worker import work
from kmnist_sweep.sweep.worker_spec import WorkerSpec
from tests.config.test_config import compose_cfg
from tests.conftest import run_cli


def trial(
    number: int, rung: int, value: float | None, state: str = "complete", **kw: object
) -> Seen:
    fields: dict[str, object] = {
        "source": number,
        "seconds": 10.0 * (3, 10)[min(rung, 1)],
        "epochs": (3, 10)[min(rung, 1)],
    }
    fields.update(kw)
    return Seen(number=number, rung=rung, state=state, value=value, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("15m", 900), ("2h", 7200), ("1h30m", 5400), ("1.5h", 5400), (600, 600)],
)
def test_durations(text: object, seconds: float) -> None:
    assert duration_s("study.budget", text) == seconds


@pytest.mark.parametrize("bad", ["15", "15 min", "m", "", "0s", -5, True, "1d"])
def test_bad_durations_are_one_config_error(bad: object) -> None:
    if bad == "15":  # a bare number in a string is not a duration: say the unit
        with pytest.raises(ConfigError, match="study.budget='15' is not a duration"):
            duration_s("study.budget", bad)
        return
    with pytest.raises(ConfigError, match="is not a duration above zero"):
        duration_s("study.budget", bad)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["study.budget=15m", "study.timeout=900"], "study.budget and study.timeout"),
        (["study.budget=15m", "study.sampler.type=grid"], "grid"),
        (["study.budget=soon"], "study.budget='soon' is not a duration"),
        (["study.budget=15m", "study.budget_rungs=[10,3]"], "must rise"),
        (["study.budget=15m", "study.budget_rungs=[3,40]"], r"budget_rungs\[1\]=40"),
        (["study.budget=15m", "study.budget_keep=1"], "study.budget_keep=1"),
    ],
)
def test_budget_config_errors(overrides: list[str], message: str) -> None:
    cfg = compose_cfg("+sweep=lr", "data=synthetic", *overrides)
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)


def test_rungs_from_the_sweeps_epochs() -> None:
    assert rung_epochs(None, 3, 10) == [1, 3, 10]
    assert rung_epochs(None, 3, 3) == [1, 3]
    assert rung_epochs(None, 2, 1) == [1]
    assert rung_epochs([3, 10], 3, 12) == [3, 10]


def test_rate_follows_the_slowest_recent_trials() -> None:
    assert per_epoch([]) is None
    assert per_epoch([trial(0, 0, None, state="running")]) is None
    seen = [trial(0, 0, 0.9, seconds=30.0), trial(1, 0, 0.9, seconds=60.0)]
    # The last trial (20 s/epoch) is slower than the mean (15): it counts, with the margin.
    assert per_epoch(seen) == pytest.approx(1.1 * 20)
    faster = [*seen, trial(2, 0, 0.9, seconds=15.0)]
    assert per_epoch(faster) == pytest.approx(1.1 * 35 / 3)


def test_plan_fills_the_time_with_halving_rungs() -> None:
    # 3 and 10 epochs at 10 s/epoch: 30 s and 100 s a trial.
    assert plan(600, 1, [3, 10], 3, 10.0) == [10, 3]  # 300 + 300 s
    assert plan(1200, 2, [3, 10], 3, 10.0) == [38, 12]  # 1140 + 1200 s of 2400
    assert plan(20, 1, [3, 10], 3, 10.0) == [0, 0]
    assert final_seconds(10.0, 10, 1.25) == pytest.approx(1.25 * 10 * 13.5)


def test_time_is_held_for_the_final_fit_of_a_rung_that_can_be_reached() -> None:
    seen = [trial(0, 0, 0.9)]
    # 10 s/epoch, train+valid 1.25x: a 10-epoch final ~169 s, a trial of it 100 s.
    assert answer_rung(seen, 1000, [3, 10], 10.0, 1.25) == 1
    assert answer_rung(seen, 200, [3, 10], 10.0, 1.25) == 0  # hold only a 3-epoch final
    assert answer_rung([*seen, trial(1, 1, 0.95)], 10, [3, 10], 10.0, 1.25) == 1


def test_first_trial_measures_then_the_best_third_is_promoted() -> None:
    first = next_step([], 600, [3, 10], 3, None, 1.25)
    assert (first.kind, first.rung, first.epochs) == ("new", 0, 3)
    seen = [trial(0, 0, 0.90), trial(1, 0, 0.95)]
    # 2 finished: neither is in the best third yet
    assert next_step(seen, 600, [3, 10], 3, 10.0, 1.25).kind == "new"
    seen.append(trial(2, 0, 0.92))
    step = next_step(seen, 600, [3, 10], 3, 10.0, 1.25)
    assert (step.kind, step.rung, step.epochs, step.source) == ("promote", 1, 10, 1)
    seen.append(trial(3, 1, None, state="running", source=1))
    assert next_step(seen, 600, [3, 10], 3, 10.0, 1.25).kind == "new"  # trial 1 went on already


def test_nothing_starts_that_would_end_after_the_budget() -> None:
    seen = [trial(0, 0, 0.90), trial(1, 0, 0.95)]
    # 10 s/epoch: a 3-epoch trial 30 s, a 10-epoch one 100 s, its final fit ~169 s.
    # 40 s before the final fit: a 3-epoch trial fits, but could not go on to 10 epochs and
    # would not be the answer once a 10-epoch trial exists: no new trial, no promotion.
    final = final_seconds(10.0, 10, 1.25)
    seen.append(trial(2, 1, 0.97, source=1))
    step = next_step(seen, 40 + final, [3, 10], 3, 10.0, 1.25)
    assert step.kind == "stop"
    # With another worker still running, this one waits for its result instead.
    running = [*seen, trial(3, 0, None, state="running")]
    assert next_step(running, 40 + final, [3, 10], 3, 10.0, 1.25).kind == "wait"
    # 110 s left: too late for a new config to reach 10 epochs, time for one promotion.
    step = next_step(seen, 110 + final, [3, 10], 3, 10.0, 1.25)
    assert (step.kind, step.source) == ("promote", 0)


def test_the_final_fit_is_held_at_the_measured_training_time() -> None:
    """A trial's wall time includes its start-up and a validation pass per epoch; the final
    fit (train + valid, no validation split) is held at the training seconds the trials'
    curves recorded, so that time is not left unused at the end."""
    # 10 s/epoch a trial, 7 s/epoch of it training.
    seen = [trial(n, 0, 0.9 + n / 100, train_seconds=21.0) for n in range(3)]
    seen.append(trial(3, 1, 0.97, source=2, train_seconds=70.0))
    assert per_train_epoch(seen) == pytest.approx(7.0)
    assert per_train_epoch([trial(0, 0, 0.9)]) is None  # no curve: a trial's own rate
    held = final_seconds(7.0, 10, 1.25)
    assert held < final_seconds(10.0, 10, 1.25)
    # Time for one more 10-epoch trial and the final fit at the measured training rate
    # (that would not fit if the final fit were held at a trial's wall rate).
    left = 100.0 + held
    assert left < 100.0 + final_seconds(10.0, 10, 1.25)
    step = next_step(seen, left, [3, 10], 3, 10.0, 1.25)
    assert (step.kind, step.rung) == ("promote", 1)
    without_curves = [dataclasses.replace(t, train_seconds=None) for t in seen]
    assert next_step(without_curves, left, [3, 10], 3, 10.0, 1.25).kind == "stop"


def test_without_a_higher_rung_yet_the_first_rung_is_the_answer() -> None:
    seen = [trial(0, 0, 0.90)]
    step = next_step(seen, 100, [3, 10], 3, 10.0, 1.25)  # 10 epochs do not fit; 3 do
    assert (step.kind, step.rung) == ("new", 0)
    assert choose(seen) == seen[0]


def test_the_answer_is_the_best_of_the_highest_rung() -> None:
    seen = [
        trial(0, 0, 0.99),
        trial(1, 0, 0.95),
        trial(2, 1, 0.97, source=1),
        trial(3, 1, 0.98, source=0),
        trial(4, 1, None, state="failed", source=4),
    ]
    answer = choose(seen)
    assert answer is not None and answer.number == 3
    assert per_rung(seen, 2) == [{"complete": 2}, {"complete": 2, "failed": 1}]
    assert choose([trial(0, 0, None, state="pruned")]) is None


def simulate(budget: float, rate: float, rungs: list[int], keep: int) -> tuple[list[Seen], float]:
    """One worker driven by next_step on a clock; every trial takes exactly rate x epochs."""
    now, seen, value = 0.0, [], 0.5
    while True:
        measured = per_epoch(seen)
        step = next_step(seen, budget - now, rungs, keep, measured, 1.25)
        if step.kind != "new" and step.kind != "promote":
            break
        seconds = rate * step.epochs
        number = len(seen)
        value = (value * 7919 % 1.0) * 0.1 + 0.01 * step.rung  # any order, higher rung higher
        source = number if step.source is None else step.source
        seen.append(Seen(number, step.rung, source, "complete", value, seconds, step.epochs))
        now += seconds
    answer = choose(seen)
    assert answer is not None
    return seen, now + final_seconds(rate, answer.epochs, 1.25) / 1.25


@pytest.mark.parametrize("budget", [300, 900, 3600])
def test_a_simulated_sweep_ends_inside_its_budget_with_the_top_rung(budget: float) -> None:
    seen, end = simulate(budget, rate=6.0, rungs=[3, 10], keep=3)
    assert 0.85 * budget <= end <= budget  # used, not overrun
    counts = per_rung(seen, 2)
    assert counts[1].get("complete", 0) >= 1  # the answer was trained at the top rung
    assert counts[0]["complete"] > counts[1]["complete"]  # halving: fewer go on
    answer = choose(seen)
    assert answer is not None and answer.rung == 1


def test_a_budget_too_short_for_the_top_rung_ends_at_the_first() -> None:
    seen, end = simulate(150, rate=6.0, rungs=[3, 10], keep=3)
    answer = choose(seen)
    assert answer is not None and answer.rung == 0
    assert 0.6 * 150 <= end <= 150


@pytest.mark.slow
def test_a_budget_ends_on_time_with_a_bundle_and_resumes_with_its_time(tmp_path: Path) -> None:
    """Through the CLI: 2 minutes, search and final fit, end inside the budget + 3%, with a
    bundle, no trial cut by the budget; the same command again finds the time spent."""
    budget = 120.0  # start-up, three 3-epoch trials, the final fit, under a loaded CI
    args = ("+sweep=budget_cpu", "data=synthetic", f"study.budget={budget:.0f}s")
    args += ("tracking=disabled", "study.report=false", "hydra.run.dir=run")
    start = time.time()
    done = run_cli(*args, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"}, timeout=600)
    wall = time.time() - start
    assert done.returncode == 0, done.stderr[-3000:]
    assert wall <= 1.03 * budget, done.stdout
    out = tmp_path / "sweeps" / "budget_cpu-synthetic"
    study = optuna.load_study(
        study_name="budget_cpu-synthetic",
        storage=f"sqlite:///{tmp_path / 'storage' / 'budget_cpu-synthetic.db'}",
    )
    trials = study.get_trials(deepcopy=False)
    assert trials and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert not any(trial_attrs.INTERRUPTED in t.user_attrs for t in trials)
    (run,) = study.user_attrs[trial_attrs.BUDGET_RUNS]
    bundle = Path(run["bundle"])
    assert (tmp_path / bundle).is_file() and bundle.parent == Path("sweeps/budget_cpu-synthetic")
    assert read_bundle(tmp_path / bundle).metrics["test/images"] == 128
    assert run["answer"]["trial"] == int(bundle.stem.removeprefix("model-trial"))
    assert f"bundle: {bundle}" in done.stdout and "budget 2m00s: search" in done.stdout
    assert (out / "report" / "budget.png").is_file()

    again = run_cli(*args, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"}, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(study.get_trials(deepcopy=False)) == len(trials)  # no time left to search
    assert "of earlier runs" in again.stdout and f"bundle: {bundle}" in again.stdout


def test_the_worker_loop_runs_the_plan_and_promotes_configs_as_sampled() -> None:
    """The real worker loop, planner and Optuna study; a quick objective whose cost is its
    epochs: new configs at the first rung, the best third again with their own params."""
    cfg = OmegaConf.create(
        {
            "study": {"budget": "4s", "budget_rungs": [1, 3], "budget_keep": 3},
            "trainer": {"epochs": 3},
            "data": {"valid_fraction": 0.2},
            "search_space": {},
        }
    )
    end = time.time() + 4.0
    budget = Budget.from_config(cfg, end)
    study = optuna.create_study(
        direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0)
    )

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        epochs = int(trial.user_attrs[trial_attrs.BUDGET_EPOCHS])
        time.sleep(0.05 * epochs)
        return x + 0.1 * epochs

    spec = WorkerSpec(
        cfg={},
        objective=None,
        n_trials=1000,
        since=datetime.datetime.now(),
        deadline=None,
        budget_end=end,
        poll=0.01,
        lock_path=None,
        max_failed=None,
        storage_patience=0.0,
    )
    work(study, objective, spec, planner=budget.step)
    trials = study.get_trials(deepcopy=False)
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert max(t.datetime_complete.timestamp() for t in trials if t.datetime_complete) < end
    promoted = [t for t in trials if t.user_attrs[trial_attrs.BUDGET_RUNG] == 1]
    assert promoted and len(promoted) < len(trials) - len(promoted)
    for t in promoted:
        source = trials[t.user_attrs[trial_attrs.BUDGET_SOURCE]]
        assert t.params == source.params and source.user_attrs[trial_attrs.BUDGET_RUNG] == 0
        assert t.user_attrs[trial_attrs.BUDGET_EPOCHS] == 3
    first = [t for t in trials if t.user_attrs[trial_attrs.BUDGET_RUNG] == 0]
    best_first = max(first, key=lambda t: t.value or 0.0)
    assert best_first.number in {t.user_attrs[trial_attrs.BUDGET_SOURCE] for t in promoted}
    answer = budgeted.answer(study, [1, 3])
    assert answer is not None and answer.user_attrs[trial_attrs.BUDGET_RUNG] == 1
