"""The one adapter to Optuna's private API. Everything here reaches past Optuna's public
interface (`study._storage`, `trial._trial_id`, the cached storage's `_backend`), so an
Optuna upgrade that moves them breaks this file alone.

Why we need it: the worker loop records a heartbeat before the objective starts (so a trial
whose worker dies at once is still failed and retried), and fails trials that the storage
lost track of, which Optuna's public API only allows for trials of this process. A trial
restarted at a halved batch replaces its dead attempt's reports and is judged on its own.
"""

from __future__ import annotations

import copy
from typing import Any, cast

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState


def storage_of(study: optuna.Study) -> BaseStorage:
    return cast(BaseStorage, study._storage)


def record_heartbeat(study: optuna.Study, trial: optuna.Trial) -> None:
    """Write the running trial's heartbeat now (Optuna's thread writes the next ones)."""
    cast(Any, study._storage).record_heartbeat(trial._trial_id)


def set_trial_attr(study: optuna.Study, trial: FrozenTrial, key: str, value: Any) -> None:
    """A user attribute on any trial of the study, also one another process is running."""
    study._storage.set_trial_user_attr(trial._trial_id, key, value)


def fail_and_retry(study: optuna.Study, trial: FrozenTrial) -> bool:
    """Fail a RUNNING trial of another process and hand it to the storage's stale-trial
    callback (which queues its retry), as Optuna's fail_stale_trials does; False when it
    had already ended."""
    storage = cast(Any, study._storage)
    try:
        if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    callback = getattr(storage, "get_heartbeat_stale_trial_callback", lambda: None)()
    if callback is not None:
        callback(study, copy.deepcopy(storage.get_trial(trial._trial_id)))
    return True


def heartbeat_interval(storage: BaseStorage) -> int | None:
    """Seconds between heartbeats of an RDB storage opened with one; None otherwise
    (journal storages have none)."""
    interval = getattr(storage, "get_heartbeat_interval", lambda: None)()
    return None if interval is None else int(interval)


def grace_period(storage: BaseStorage) -> int:
    """Seconds without a heartbeat before a trial counts as dead (Optuna's default: twice
    the interval). Optuna wraps an RDBStorage in a cache whose `_backend` holds it."""
    backend = getattr(storage, "_backend", storage)
    interval = heartbeat_interval(storage) or 0
    return int(getattr(backend, "grace_period", None) or 2 * interval)


def replace_report(trial: optuna.Trial, step: int, value: float) -> None:
    """Overwrite a step `trial.report` already stored (it ignores a second report): a
    restarted attempt's value replaces the dead attempt's in the study."""
    trial.study._storage.set_trial_intermediate_value(trial._trial_id, step, value)


def should_prune_on(trial: optuna.Trial, reports: dict[int, float], rungs: dict[str, Any]) -> bool:
    """The study's pruner on `trial` as if `reports` (step -> value) were all it reported.

    `should_prune` judges the last stored step, which after a restart may be a step only the
    dead attempt reached. Successive halving and Hyperband keep the rungs a trial passed in
    its system attributes and compare every trial's: here the pruner sees, for this trial,
    only the rungs of `rungs` (this attempt's, which it adds to), so each rung is judged
    and recorded again with this attempt's value."""
    study = trial.study
    stored = study._storage.get_trial(trial._trial_id)
    view = copy.copy(stored)
    view.intermediate_values = dict(reports)
    view.system_attrs = {
        **{k: v for k, v in stored.system_attrs.items() if not k.startswith(_RUNG)},
        **rungs,
    }
    shown = optuna.Study(
        study_name=study.study_name,
        storage=cast(BaseStorage, _ShownAs(study._storage, view, rungs)),
        sampler=study.sampler,
        pruner=study.pruner,
    )
    return study.pruner.prune(shown, view)


_RUNG = "completed_rung_"  # successive halving's record of a rung a trial passed


class _ShownAs:
    """A storage that reads as `inner` with one trial replaced by `view`; writes go on to
    `inner`, and that trial's rung records are also kept in `rungs`."""

    def __init__(self, inner: BaseStorage, view: FrozenTrial, rungs: dict[str, Any]) -> None:
        self.inner = inner
        self.view = view
        self.rungs = rungs

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        return self.view if trial_id == self.view._trial_id else self.inner.get_trial(trial_id)

    def get_all_trials(
        self, study_id: int, deepcopy: bool = True, states: Any = None
    ) -> list[FrozenTrial]:
        trials = self.inner.get_all_trials(study_id, deepcopy=deepcopy, states=states)
        return [self.view if t._trial_id == self.view._trial_id else t for t in trials]

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        if trial_id == self.view._trial_id and key.startswith(_RUNG):
            self.rungs[key] = value
        self.inner.set_trial_system_attr(trial_id, key, value)
