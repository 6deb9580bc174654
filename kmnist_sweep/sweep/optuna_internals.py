"""The one adapter to Optuna's private API. Everything here reaches past Optuna's public
interface (`study._storage`, `trial._trial_id`, the cached storage's `_backend`), so an
Optuna upgrade that moves them breaks this file alone.

Why we need it: the worker loop records a heartbeat before the objective starts (so a trial
whose worker dies at once is still failed and retried), and fails trials that the storage
lost track of, which Optuna's public API only allows for trials of this process.
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
