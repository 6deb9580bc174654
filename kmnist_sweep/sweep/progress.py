"""The study-level progress bar: finished / total, best so far, one line per ended trial.
It polls the storage, so it shows the work of every worker, local or on a cluster. For a
multi-objective study "best" is the best value of the first metric, and each ended trial's
line shows every metric."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from kmnist_sweep import trial_attrs
from kmnist_sweep.sweep.storage import STORAGE_ERRORS
from kmnist_sweep.sweep.study import FINISHED


class Progress:
    """A study-level bar (finished / total, best so far) fed by polling the storage."""

    def __init__(
        self,
        study: optuna.Study,
        n_trials: int,
        metric: str,
        status: Callable[[], str] | None = None,
    ) -> None:
        self.study = study
        self.n_trials = n_trials
        self.metric = metric
        self.status = status  # a budgeted sweep's phase and time left
        # A multi-objective study names its values (sweep/study.py sets them); one value
        # keeps the metric it was given.
        names = study.metric_names if len(study.directions) > 1 else None
        self.metrics: list[str] = list(names or [metric])
        trials = study.get_trials(deepcopy=False)
        self.seen = {t.number for t in trials if t.state.is_finished()}
        finished = sum(t.state in FINISHED for t in trials)
        # A budget, not a count, ends a budgeted sweep: its bar counts without a total.
        total = None if status is not None else n_trials
        self.bar = tqdm(
            total=total,
            initial=finished if total is None else min(finished, n_trials),
            desc=study.study_name,
            unit="trial",
            dynamic_ncols=True,
            file=sys.stderr,
        )

    def refresh(self) -> None:
        try:
            trials = self.study.get_trials(deepcopy=False)
        except STORAGE_ERRORS:
            return  # the workers retry the storage; the bar waits for it too
        for t in trials:
            if t.state.is_finished() and t.number not in self.seen:
                self.seen.add(t.number)
                self.bar.write(describe_trial(t, self.metrics))
        finished = sum(t.state in FINISHED for t in trials)
        self.bar.n = finished if self.bar.total is None else min(finished, self.bar.total)
        complete = [t for t in trials if t.state == TrialState.COMPLETE and t.values]
        postfix: dict[str, Any] = {
            "running": sum(t.state == TrialState.RUNNING for t in trials),
            "pruned": sum(t.state == TrialState.PRUNED for t in trials),
        }
        if self.status is not None:
            postfix["budget"] = self.status()
        if complete:
            first = self.study.directions[0]
            sign = 1.0 if first == optuna.study.StudyDirection.MAXIMIZE else -1.0
            best = max(complete, key=lambda t: sign * t.values[0])
            shown = f"{self.metrics[0]} " if len(self.metrics) > 1 else ""
            postfix["best"] = f"{shown}{best.values[0]:.4f} (#{best.number})"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def describe_trial(t: FrozenTrial, metrics: Sequence[str]) -> str:
    """`trial 7 complete val/acc=0.9120 trainer.batch_size=256 (3.1 s)`; one `name=value`
    per metric of a multi-objective study."""
    overrides = trial_attrs.overrides_of(t.user_attrs) or [f"{k}={v}" for k, v in t.params.items()]
    value = "".join(f" {m}={v:.4f}" for m, v in zip(metrics, t.values or [], strict=False))
    if t.state == TrialState.PRUNED and t.intermediate_values:
        step = max(t.intermediate_values)
        value = f" at {pruned_where(t, step)}: {metrics[0]}={t.intermediate_values[step]:.4f}"
    seconds = f" ({t.duration.total_seconds():.1f} s)" if t.duration else ""
    return f"trial {t.number} {t.state.name.lower()}{value} {' '.join(overrides)}{seconds}"


def pruned_where(t: FrozenTrial, step: int) -> str:
    """`epoch 4 (40% of its schedule)` when epochs are searched (the pruner's steps are then
    percents of each trial's schedule, `study.report_steps`), else `epoch 4`."""
    reason = str(t.user_attrs.get(trial_attrs.REASON, ""))
    epoch = reason.removeprefix(trial_attrs.PRUNED_AT)
    if epoch == reason or not epoch.isdigit() or int(epoch) == step:
        return f"epoch {step}"
    return f"epoch {epoch} ({step}% of its schedule)"
