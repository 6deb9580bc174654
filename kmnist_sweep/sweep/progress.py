"""The study-level progress bar: finished / total, best so far, one line per ended trial.
It polls the storage, so it shows the work of every worker, local or on a cluster."""

from __future__ import annotations

import sys
from typing import Any, cast

import optuna
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from kmnist_sweep import trial_attrs
from kmnist_sweep.sweep.storage import STORAGE_ERRORS
from kmnist_sweep.sweep.study import FINISHED


class Progress:
    """A study-level bar (finished / total, best so far) fed by polling the storage."""

    def __init__(self, study: optuna.Study, n_trials: int, metric: str) -> None:
        self.study = study
        self.metric = metric
        trials = study.get_trials(deepcopy=False)
        self.seen = {t.number for t in trials if t.state.is_finished()}
        finished = sum(t.state in FINISHED for t in trials)
        self.bar = tqdm(
            total=n_trials,
            initial=min(finished, n_trials),
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
                self.bar.write(describe_trial(t, self.metric))
        finished = sum(t.state in FINISHED for t in trials)
        self.bar.n = min(finished, self.bar.total)
        complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
        postfix: dict[str, Any] = {
            "running": sum(t.state == TrialState.RUNNING for t in trials),
            "pruned": sum(t.state == TrialState.PRUNED for t in trials),
        }
        if complete:
            sign = 1.0 if self.study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
            best = max(complete, key=lambda t: sign * cast(float, t.value))
            postfix["best"] = f"{best.value:.4f} (#{best.number})"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def describe_trial(t: FrozenTrial, metric: str) -> str:
    """`trial 7 complete val/acc=0.9120 trainer.batch_size=256 (3.1 s)`."""
    overrides = trial_attrs.overrides_of(t.user_attrs) or [f"{k}={v}" for k, v in t.params.items()]
    value = f" {metric}={t.value:.4f}" if t.value is not None else ""
    if t.state == TrialState.PRUNED and t.intermediate_values:
        step = max(t.intermediate_values)
        value = f" at epoch {step}: {metric}={t.intermediate_values[step]:.4f}"
    seconds = f" ({t.duration.total_seconds():.1f} s)" if t.duration else ""
    return f"trial {t.number} {t.state.name.lower()}{value} {' '.join(overrides)}{seconds}"
