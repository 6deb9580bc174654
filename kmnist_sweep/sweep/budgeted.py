"""A budgeted sweep's side of the study (`study.budget`): the planner's view of the trials,
the trials it queues, the time accounting that survives a stop, the answer.

    budget = Budget.from_config(cfg, end=started + budget_s - spent_s(study))
    work(study, objective, spec, planner=budget.step)  # every free worker asks it

The decisions are sweep/budget.py's; this module turns trials into what it reads and its
steps into queued trials. Workers on other processes or machines build their own Budget
from the same config and end time: the study is the only state they share.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from omegaconf import DictConfig
from optuna.trial import FrozenTrial, TrialState

from kmnist_sweep import trial_attrs
from kmnist_sweep.config.search_space import EPOCHS_KEY
from kmnist_sweep.config.values import duration_s
from kmnist_sweep.sweep.budget import Seen, Step, choose, next_step, per_epoch, rung_epochs

STATES = {
    TrialState.COMPLETE: "complete",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
    TrialState.RUNNING: "running",
    TrialState.WAITING: "waiting",
}


def budget_s(cfg: DictConfig) -> float | None:
    """study.budget in seconds (None: not a budgeted sweep)."""
    return duration_s("study.budget", cfg.study.get("budget"))


def rungs_of(cfg: DictConfig) -> list[int]:
    """Epochs of each rung: study.budget_rungs, else from the sweep's longest schedule."""
    searched = cfg.search_space.get(EPOCHS_KEY)
    top = int(searched["high"]) if searched is not None else int(cfg.trainer.epochs)
    return rung_epochs(cfg.study.get("budget_rungs"), int(cfg.study.budget_keep), top)


def final_scale(cfg: DictConfig) -> float:
    """The final fit's training images over a trial's: valid joins train there."""
    return 1.0 / (1.0 - float(cfg.data.valid_fraction))


def seen_of(study: optuna.Study, trials: Sequence[FrozenTrial], rungs: list[int]) -> list[Seen]:
    """The trials as the planner sees them; a trial queued by other means (the defaults'
    trial 0) runs the first rung, as the objective gives it."""
    sign = 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
    seen = []
    for t in trials:
        if t.state not in STATES:
            continue
        rung = int(t.user_attrs.get(trial_attrs.BUDGET_RUNG, 0))
        epochs = t.user_attrs.get(trial_attrs.BUDGET_EPOCHS, rungs[min(rung, len(rungs) - 1)])
        seconds = t.duration.total_seconds() if t.duration else None
        curve = t.user_attrs.get(trial_attrs.CURVE) or [{}]
        train_seconds = curve[-1].get("seconds")
        seen.append(
            Seen(
                number=t.number,
                rung=rung,
                source=int(t.user_attrs.get(trial_attrs.BUDGET_SOURCE, t.number)),
                state=STATES[t.state],
                value=None if t.value is None else sign * t.value,
                seconds=seconds,
                epochs=int(epochs),
                train_seconds=None if train_seconds is None else float(train_seconds),
            )
        )
    return seen


@dataclass
class Budget:
    """One process's planner on a budgeted study; `end` is when the budget runs out (Unix
    time), the final fit included."""

    rungs: list[int]
    keep: int
    scale: float
    end: float
    last: Step | None = None
    steps: list[Step] = field(default_factory=list)

    @classmethod
    def from_config(cls, cfg: DictConfig, end: float) -> Budget:
        keep = int(cfg.study.budget_keep)
        return cls(rungs_of(cfg), keep, final_scale(cfg), end)

    def step(self, study: optuna.Study, trials: Sequence[FrozenTrial]) -> str:
        """Queue the next trial for this worker: `run` (queued), `wait` or `stop`."""
        seen = seen_of(study, trials, self.rungs)
        left = self.end - time.time()
        step = next_step(seen, left, self.rungs, self.keep, per_epoch(seen), self.scale)
        self.last = step
        if step.kind == "new":
            attrs = {trial_attrs.BUDGET_RUNG: 0, trial_attrs.BUDGET_EPOCHS: step.epochs}
            study.enqueue_trial({}, user_attrs=attrs)
        elif step.kind == "promote":
            source = next(t for t in trials if t.number == step.source)
            attrs = {
                trial_attrs.BUDGET_RUNG: step.rung,
                trial_attrs.BUDGET_EPOCHS: step.epochs,
                trial_attrs.BUDGET_SOURCE: source.number,
            }
            study.enqueue_trial(dict(source.params), user_attrs=attrs)
        else:
            return step.kind
        self.steps.append(step)
        return "run"

    def status(self) -> str:
        """The progress bar's: the phase and the time left."""
        left = max(self.end - time.time(), 0.0)
        phase = "search" if self.last is None or self.last.kind != "stop" else "search done"
        return f"{phase}, {clock(left)} left"


def clock(seconds: float) -> str:
    """`12m05s`, `1h02m`, `45s`."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def spent_s(study: optuna.Study) -> float:
    """Seconds of the budget that earlier runs of this study used."""
    return float(study.user_attrs.get(trial_attrs.BUDGET_SPENT, 0.0))


def save_spent(study: optuna.Study, seconds: float) -> None:
    study.set_user_attr(trial_attrs.BUDGET_SPENT, round(seconds, 1))


def record_run(study: optuna.Study, record: dict[str, Any]) -> None:
    """Append this run's plan and what happened to the study's list of runs."""
    runs = list(study.user_attrs.get(trial_attrs.BUDGET_RUNS, []))
    study.set_user_attr(trial_attrs.BUDGET_RUNS, [*runs, record])


def answer(study: optuna.Study, rungs: list[int]) -> FrozenTrial | None:
    """The trial the final fit retrains: the best of the highest rung reached."""
    trials = study.get_trials(deepcopy=False)
    chosen = choose(seen_of(study, trials, rungs))
    return None if chosen is None else next(t for t in trials if t.number == chosen.number)
