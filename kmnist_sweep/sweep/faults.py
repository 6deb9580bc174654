"""What a worker does when things go wrong: Ctrl-C and SIGTERM, a storage that stops
answering, trials that keep failing. The fault table is in docs/operations.md.

    with stop_on_signals(defer=True):   # a worker: signals fail the running trial cleanly
        ...
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from kmnist_sweep import trial_attrs
from kmnist_sweep.errors import Interrupted, SweepStopped, error_line
from kmnist_sweep.sweep.storage import STORAGE_ERRORS

log = logging.getLogger(__name__)


STOP_WAIT_S = 10.0  # seconds workers get to record their trial after Ctrl-C


def signum_of(exc: BaseException) -> int:
    return int(getattr(exc, "signum", signal.SIGINT))


class _Stop:
    """Signal state shared by nested handlers (a sweep's and its in-process worker's)."""

    seen = threading.Event()  # our code caught the Interrupted: stopping, ignore more signals
    pending: int | None = None  # a signal that arrived between trials, raised at a safe point
    in_trial = False  # the objective is running: raise at once, Optuna fails the trial


def stop_seen(exc: BaseException) -> None:
    """Call where an Interrupted is caught: the run is stopping, later signals are ignored."""
    if isinstance(exc, KeyboardInterrupt):
        _Stop.seen.set()


@contextmanager
def stop_on_signals(defer: bool = False) -> Iterator[None]:
    """Ctrl-C (SIGINT) and SIGTERM (`kill PID`, a scheduler's stop) raise Interrupted, so
    Optuna fails the running trial and records it, outputs are written and the same
    command resumes.

    With `defer` (a worker), a signal that arrives outside the objective waits for the
    next safe point (`raise_pending`): raised inside Optuna's own storage writes it would
    leave a trial RUNNING. Python swallows an exception raised inside a finalizer (a
    weakref callback, `__del__`), so the signal is sent again a second later unless our
    code has seen the exception by then."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        if _Stop.seen.is_set():
            return
        if defer and not _Stop.in_trial:
            _Stop.pending = signum
            return
        timer = threading.Timer(1.0, _send_again, (signum,))
        timer.daemon = True
        timer.start()
        raise Interrupted("terminated" if signum == signal.SIGTERM else "interrupted", signum)

    def unraisable(args: Any) -> None:
        if not isinstance(args.exc_value, Interrupted):  # swallowed ones are sent again
            previous_hook(args)

    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):  # the outermost handler
        _Stop.seen.clear()
        _Stop.pending = None
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        yield
    except KeyboardInterrupt as exc:
        stop_seen(exc)
        raise
    finally:
        sys.unraisablehook = previous_hook
        for sig, old in previous.items():
            signal.signal(sig, old)


def raise_pending() -> None:
    """Raise the signal that arrived between trials, if any."""
    if _Stop.pending is not None and not _Stop.seen.is_set():
        signum, _Stop.pending = _Stop.pending, None
        raise Interrupted("terminated" if signum == signal.SIGTERM else "interrupted", signum)


@contextmanager
def in_trial() -> Iterator[None]:
    raise_pending()
    _Stop.in_trial = True
    try:
        yield
    finally:
        _Stop.in_trial = False


def _send_again(signum: int) -> None:
    if not _Stop.seen.is_set():
        os.kill(os.getpid(), signum)


class TrialTakenOver(Exception):
    """A running trial that another worker failed as stale: its retry replaces it."""


@contextmanager
def quiet_expected_tracebacks() -> Iterator[None]:
    """One line, not a traceback, for faults the runner handles: Optuna's heartbeat thread
    dying with the storage (its trial is retried once stale), a trial failed by Ctrl-C or
    SIGTERM, and one failed as stale while it ran. A trial failing with its own error keeps
    its traceback: that is a bug."""
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if isinstance(args.exc_value, STORAGE_ERRORS):
            log.warning("heartbeat stopped: %s", error_line(args.exc_value))
        else:
            previous(args)

    def no_interrupt_traceback(record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt | TrialTakenOver):
            record.exc_info = None
        return True

    handlers = logging.getLogger("optuna").handlers
    threading.excepthook = hook
    for handler in handlers:
        handler.addFilter(no_interrupt_traceback)
    try:
        yield
    finally:
        threading.excepthook = previous
        for handler in handlers:
            handler.removeFilter(no_interrupt_traceback)


class Outage:
    """Backoff while the storage does not answer; SweepStopped once patience runs out."""

    def __init__(self, start: float, patience: float) -> None:
        self.start = start
        self.patience = patience  # seconds
        self.tries = 0

    def wait(self, exc: BaseException) -> None:
        waited = time.time() - self.start
        if waited >= self.patience:
            raise SweepStopped(
                f"the storage did not answer for {waited:.0f} s ({error_line(exc)}); "
                "the study holds every trial finished before: run the same command again "
                "once it is back"
            ) from None
        delay = min(0.5 * 2**self.tries, 10.0, self.patience - waited)
        self.tries += 1
        log.warning("storage unreachable (%s); retrying in %.1f s", error_line(exc), delay)
        time.sleep(max(delay, 0.0))


def failed_with_error(
    trials: Sequence[FrozenTrial], since: datetime.datetime
) -> list[FrozenTrial]:
    """Trials of this run that raised an error (not dead workers' trials, not pruned ones)."""
    return [
        t
        for t in trials
        if t.state == TrialState.FAIL
        and trial_attrs.ERROR in t.user_attrs
        and t.datetime_start is not None
        and t.datetime_start >= since
    ]


def check_failures(
    trials: Sequence[FrozenTrial], since: datetime.datetime, max_failed: int | None
) -> None:
    if max_failed is None:
        return
    failed = failed_with_error(trials, since)
    if len(failed) >= max_failed:
        last = max(failed, key=lambda t: t.number)
        raise SweepStopped(
            f"{len(failed)} trials failed with an error in this run (study.max_failed="
            f"{max_failed}); last, trial {last.number}: {last.user_attrs[trial_attrs.ERROR]}; "
            "fix the cause and run the same command again"
        )
