"""One worker's loop on a shared study: take a free slot, run a trial, repeat until the
study holds its total. Local worker processes and SLURM jobs run the same loop.

    work(study, objective, spec)      # spec: sweep/worker_spec.py, made once per sweep
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path

import optuna
from omegaconf import OmegaConf
from optuna.trial import FrozenTrial, TrialState

from kmnist_sweep import trial_attrs
from kmnist_sweep.config.search_space import parse_space
from kmnist_sweep.errors import SweepStopped, error_line
from kmnist_sweep.sweep import budgeted, optuna_internals
from kmnist_sweep.sweep.faults import (
    Outage,
    TrialTakenOver,
    check_failures,
    in_trial,
    quiet_expected_tracebacks,
    raise_pending,
    signum_of,
    stop_on_signals,
    stop_seen,
)
from kmnist_sweep.sweep.protocol import as_sweep_objective, load_factory
from kmnist_sweep.sweep.storage import STORAGE_ERRORS, quiet_optuna_warnings, storage_cause
from kmnist_sweep.sweep.study import FINISHED, grid_exhausted, heartbeat_enabled, open_sweep_study
from kmnist_sweep.sweep.worker_spec import WorkerSpec, from_payload

log = logging.getLogger(__name__)

# A budgeted sweep's planner: given the study and its trials, queue the next trial ("run"),
# or "wait" or "stop".
Planner = Callable[[optuna.Study, Sequence[FrozenTrial]], str]


def work(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], float | Sequence[float]],
    spec: WorkerSpec,
    *,
    on_trial_end: Callable[[], None] | None = None,
    planner: Planner | None = None,
) -> None:
    """One worker's loop: run trials until the study holds `spec.n_trials` finished ones,
    starting none after `spec.deadline`.

    Several workers (processes or machines) may run it on one study. A worker starts a
    trial only while finished + running + queued < n_trials, or to take a queued retry;
    otherwise it waits, failing stale trials (dead workers) so their retries get queued.
    Workers on one host decide and create their trial under the file lock `spec.lock_path`,
    so two never take the last free slot; across hosts, the later trial (by number) stands
    down.

    Faults: a storage that stops answering is retried for `spec.storage_patience` seconds,
    then the worker stops with `SweepStopped` (the study is as the storage last saw it). When
    `spec.max_failed` trials of this run (all workers) have raised an error, the cause is a bug
    rather than bad luck: the worker stops instead of failing every remaining trial.
    SIGTERM is handled as Ctrl-C: the running trial is failed and recorded.

    A budgeted sweep's `planner` (sweep/budgeted.py) decides, under the lock, what the next
    trial runs and queues it (`run`), or says `wait` (others' results may change its mind)
    or `stop` (no trial fits in the time left).
    """
    n_trials, since, poll = spec.n_trials, spec.since, spec.poll
    heartbeat = heartbeat_enabled(optuna_internals.storage_of(study))
    slot = _SlotLock(spec.lock_path)

    def guarded(trial: optuna.Trial) -> float | Sequence[float]:
        slot.release()  # the trial exists now: other workers count it
        mine.append(trial.number)
        try:
            if _taken_before(study, trial.number, since, heartbeat) >= n_trials:
                trial.set_user_attr(trial_attrs.SURPLUS, True)
                raise _Surplus(f"study already holds {n_trials} finished or running trials")
            if heartbeat:  # before `started`: see _fail_unstarted
                optuna_internals.record_heartbeat(study, trial)
            trial.set_user_attr(trial_attrs.STARTED, trial.number)
            trial.set_user_attr(trial_attrs.PROCESS, process_tag(os.getpid()))
            trial.set_user_attr(trial_attrs.WORKER, os.environ.get("KMNIST_SWEEP_WORKER", "0"))
            with in_trial():
                return objective(trial)
        except (optuna.TrialPruned, _Surplus):
            raise
        except optuna.exceptions.UpdateFinishedTrialError as exc:
            # Failed as stale by another worker while this one ran it (a process paused past
            # the grace period, a heartbeat thread that died): its retry stands in for it.
            raise TrialTakenOver(f"trial {trial.number}: {error_line(exc)}") from None
        except STORAGE_ERRORS as exc:
            with suppress(*STORAGE_ERRORS):  # back already? then say why it failed
                trial.set_user_attr(trial_attrs.STORAGE_ERROR, error_line(exc))
            raise
        except KeyboardInterrupt as exc:
            stop_seen(exc)
            trial.set_user_attr(trial_attrs.INTERRUPTED, signal.Signals(signum_of(exc)).name)
            raise
        except Exception as exc:  # the trial's own failure, counted against max_failed
            trial.set_user_attr(trial_attrs.ERROR, error_line(exc))
            raise

    callbacks = [lambda _s, _t: on_trial_end()] if on_trial_end else []
    outage: Outage | None = None
    mine: list[int] = []  # this worker's trial, while the objective runs
    try:
        with stop_on_signals(defer=True), quiet_expected_tracebacks():
            while spec.deadline is None or time.time() < spec.deadline:
                try:
                    raise_pending()
                    slot.acquire()
                    # Under the lock: SQLite cannot make "RUNNING -> FAIL" atomic, and two
                    # workers failing one dead trial at once would queue two retries of it.
                    _fail_stale(study)
                    trials = study.get_trials(deepcopy=False)
                    if outage is not None:
                        _fail_orphans(study, trials, mine)
                        outage = None
                    mine.clear()
                    check_failures(trials, since, spec.max_failed)
                    finished = sum(t.state in FINISHED for t in trials)
                    queued = sum(t.state == TrialState.WAITING for t in trials)
                    running = sum(_counts_as_running(t, since, heartbeat) for t in trials)
                    if finished >= n_trials or grid_exhausted(study):
                        return
                    if queued == 0 and finished + running >= n_trials:
                        if not heartbeat:
                            return  # no heartbeat: nobody fails a dead worker's trial
                        slot.release()
                        time.sleep(poll)  # others still run; one may die and be retried
                        continue
                    if planner is not None and queued == 0:
                        decision = planner(study, trials)
                        if decision == "stop":
                            return
                        if decision == "wait":
                            slot.release()
                            time.sleep(poll)
                            continue
                    with quiet_optuna_warnings():
                        # A failed trial is recorded with its error and the sweep goes on;
                        # max_failed stops it when every trial fails.
                        study.optimize(
                            guarded, n_trials=1, catch=(Exception,), callbacks=callbacks
                        )
                    mine.clear()
                except optuna.exceptions.UpdateFinishedTrialError as exc:
                    # Our trial was failed as stale while the storage was away; its retry
                    # stands in for it.
                    log.warning("%s; its retry replaces it", error_line(exc))
                except Exception as exc:
                    # The same, seen by Optuna as it records our trial's end ("Cannot tell a
                    # FAIL trial", or its own assertion after that): this host was cut off
                    # long enough for other workers to fail the trial as stale.
                    if isinstance(exc, ValueError | AssertionError) and _failed_elsewhere(
                        study, mine
                    ):
                        log.warning(
                            "trial %d was failed by another worker (%s); its retry replaces it",
                            mine[-1],
                            error_line(exc),
                        )
                        continue
                    # The storage lost: Optuna may say so with its own assertion ("Should
                    # not reach") raised while it records the trial's end without a storage.
                    cause = storage_cause(exc)
                    if cause is None:
                        raise
                    slot.release()
                    outage = outage or Outage(time.time(), spec.storage_patience)
                    outage.wait(cause)
                finally:
                    slot.release()  # in case the trial was never created (ask failed)
    finally:
        slot.close()


def _failed_elsewhere(study: optuna.Study, numbers: list[int]) -> bool:
    """Our running trial is already FAIL in the storage: another worker failed it."""
    if not numbers:
        return False
    with suppress(*STORAGE_ERRORS):
        trials = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        return any(t.number == numbers[-1] for t in trials)
    return False


def _fail_orphans(study: optuna.Study, trials: Sequence[FrozenTrial], numbers: list[int]) -> None:
    """This worker's trial whose end the storage missed: failed now, not left RUNNING until
    its heartbeat goes stale (nobody would fail it once the study is full)."""
    for t in trials:
        if t.number in numbers and t.state == TrialState.RUNNING:
            _fail_lost(study, t, "lost its end")


def _fail_lost(study: optuna.Study, t: FrozenTrial, why: str) -> None:
    """Fail a RUNNING trial the storage lost track of, saying why (`storage_error`); another
    worker failing it first is fine."""
    optuna_internals.set_trial_attr(study, t, trial_attrs.STORAGE_ERROR, why)
    with suppress(optuna.exceptions.UpdateFinishedTrialError):
        study.tell(t.number, state=TrialState.FAIL)


def process_tag(pid: int) -> str:
    """A worker process, unique among the hosts that share a study."""
    return f"{socket.gethostname()}:{pid}"


def fail_trials_of(study: optuna.Study, pid: int, signum: int, lock_path: Path | None) -> int:
    """Fail the RUNNING trials of this host's dead worker `pid` (killed by `signum`) and queue
    their retries as a stale heartbeat would, at once rather than after the grace period, and
    also when no worker is left to notice; how many. Another worker failing one first is fine.
    """
    tag = process_tag(pid)
    slot = _SlotLock(lock_path)  # the lock _fail_stale runs under: one retry per trial
    failed = 0
    try:
        slot.acquire()
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.user_attrs.get(trial_attrs.PROCESS) != tag:
                continue
            optuna_internals.set_trial_attr(
                study, t, trial_attrs.INTERRUPTED, signal.Signals(signum).name
            )
            if optuna_internals.fail_and_retry(study, t):
                failed += 1
    finally:
        slot.close()
    return failed


class _SlotLock:
    """An exclusive flock on a file: "is a slot free? then create the trial" as one step."""

    def __init__(self, path: Path | None) -> None:
        self.file = None
        self.held = False
        if path is not None and sys.platform != "win32":
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a")  # noqa: SIM115 (held for the worker's lifetime)

    def acquire(self) -> None:
        if self.file is not None and not self.held:
            import fcntl

            fcntl.flock(self.file, fcntl.LOCK_EX)
            self.held = True

    def release(self) -> None:
        if self.file is not None and self.held:
            import fcntl

            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.held = False

    def close(self) -> None:
        self.release()
        if self.file is not None:
            self.file.close()
            self.file = None


class _Surplus(Exception):
    """A trial started after the study already had all it needs."""


def _taken_before(
    study: optuna.Study, number: int, since: datetime.datetime, heartbeat: bool
) -> int:
    count = 0
    for t in study.get_trials(deepcopy=False):
        if t.state in FINISHED:
            count += t.number != number
        elif t.number < number and (
            t.state == TrialState.WAITING or _counts_as_running(t, since, heartbeat)
        ):
            count += 1
    return count


def _counts_as_running(t: FrozenTrial, since: datetime.datetime, heartbeat: bool) -> bool:
    """Running trials hold a slot; without heartbeats, ones older than this run may be dead."""
    if t.state != TrialState.RUNNING:
        return False
    return heartbeat or t.datetime_start is None or t.datetime_start >= since


def _fail_stale(study: optuna.Study) -> None:
    with quiet_optuna_warnings():
        optuna.storages.fail_stale_trials(study)
    _fail_unstarted(study)


def _fail_unstarted(study: optuna.Study) -> None:
    """Fail RUNNING trials that never reached the objective and whose worker is gone.

    Optuna only fails a trial whose heartbeat went stale; one whose worker died or lost the
    storage between creating it and its first heartbeat has none and would stay RUNNING
    (and hold a slot) for ever. Ours record a heartbeat and then `started` (their own
    number: a retry inherits the attributes of the trial it retries) before the objective
    starts, so a trial without it after a grace period is such a one: failed and queued
    again, as a stale heartbeat would be."""
    storage = optuna_internals.storage_of(study)
    if not heartbeat_enabled(storage):
        return
    grace = optuna_internals.grace_period(storage)
    cutoff = datetime.datetime.now() - datetime.timedelta(seconds=grace)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        started = t.user_attrs.get(trial_attrs.STARTED) == t.number
        if not started and t.datetime_start and t.datetime_start < cutoff:
            optuna_internals.set_trial_attr(study, t, trial_attrs.STORAGE_ERROR, "never started")
            optuna_internals.fail_and_retry(study, t)


def worker_main() -> None:
    """Entry of a worker process: its payload (worker_spec.to_payload) on stdin."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    worker_run(*from_payload(json.loads(sys.stdin.read())))


def worker_run(spec: WorkerSpec, index: int) -> None:
    """Worker `index` of the sweep in `spec`: the loop of the runner's worker processes and
    of the launcher's cluster jobs alike."""
    cfg = OmegaConf.create(spec.cfg)
    OmegaConf.set_struct(cfg, True)
    params = parse_space(cfg.search_space, cfg)
    objective = as_sweep_objective(load_factory(str(spec.objective))(cfg))
    study = open_sweep_study(cfg.study, params, index, objective.constraint)
    end = spec.budget_end
    planner = None if end is None else budgeted.Budget.from_config(cfg, end).step
    log.info("worker %d (pid %d) joins study %s", index, os.getpid(), study.study_name)
    try:
        work(study, objective, spec, planner=planner)
    except KeyboardInterrupt as exc:
        log.info("worker %d interrupted", index)
        sys.exit(128 + signum_of(exc))
    except SweepStopped as exc:
        log.error("worker %d stopped: %s", index, exc)
        sys.exit(1)
    log.info("worker %d done", index)
