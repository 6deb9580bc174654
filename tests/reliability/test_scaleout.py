"""Scale-out on one study: several launchers started at the same instant on a new database
(the first start creates the storage's tables), and a launcher whose workers keep dying.

Each launcher is `python -m kmnist_sweep` with 8 worker processes on the toy objective.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy
from optuna.trial import TrialState

from tests.reliability.harness import (
    PG_URL,
    Sweep,
    assert_consistent,
    load,
    no_traceback,
    record,
    toy_args,
)

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

LAUNCHERS = 3
WORKERS = 8


@contextlib.contextmanager
def fresh_pg_database() -> Iterator[str]:
    """A new, empty PostgreSQL database on the server of KMNIST_SWEEP_PG_URL; dropped after."""
    assert PG_URL is not None
    admin = sqlalchemy.make_url(PG_URL)
    if admin.drivername == "postgresql" and not importlib.util.find_spec("psycopg"):
        admin = admin.set(drivername="postgresql+psycopg2")  # the driver our extra installs
    name = f"ks_first_{uuid.uuid4().hex[:10]}"
    engine = sqlalchemy.create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as con:
        con.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        with engine.connect() as con:
            con.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()


def start_together(url: str, n_trials: int, cwd: Path) -> list[Sweep]:
    """LAUNCHERS launchers of one study, as a job array starts them: at the same instant.
    Each waits for a common start time after its imports (the toy's start_at), so none is
    ahead of the others when it opens the new storage."""
    at = time.time() + 12
    args = toy_args(
        f"study.n_trials={n_trials}",
        f"study.workers={WORKERS}",
        f"study.storage='{url}'",
        "study.name=first-start",
        f"+toy.start_at={at}",
        epochs=2,
        sleep=0.05,
    )
    return [Sweep(args, cwd) for _ in range(LAUNCHERS)]


def check_all_ran(sweeps: list[Sweep], url: str, n_trials: int, what: str) -> None:
    for sweep in sweeps:
        assert sweep.wait() == 0, sweep.stderr
        no_traceback(sweep)
    study = load(url, "first-start")
    assert_consistent(study, n_trials)
    record(what, study, launchers=LAUNCHERS, workers=WORKERS)


@pytest.mark.postgres
@pytest.mark.skipif(not PG_URL, reason="KMNIST_SWEEP_PG_URL is not set")
def test_launchers_started_together_on_a_new_postgresql_database_all_run(
    tmp_path: Path,
) -> None:
    with fresh_pg_database() as url:
        sweeps = start_together(url, 30, tmp_path)
        check_all_ran(sweeps, url, 30, "first_start_postgresql")


def test_launchers_started_together_on_a_new_sqlite_file_all_run(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'storage' / 'new.db'}"
    sweeps = start_together(url, 30, tmp_path)
    check_all_ran(sweeps, url, 30, "first_start_sqlite")


def test_killed_workers_are_replaced_until_the_total_is_reached(tmp_path: Path) -> None:
    """The workers of one launcher killed one by one mid-trial, more kills than workers: each
    is replaced, the total is reached, and no trial of a dead worker stays RUNNING."""
    url = f"sqlite:///{tmp_path / 'storage' / 'replace.db'}"
    n, kills = 80, WORKERS + 4
    args = toy_args(
        f"study.n_trials={n}",
        f"study.workers={WORKERS}",
        f"study.storage='{url}'",
        "study.name=replace",
        f"launcher.max_worker_restarts={kills}",
        "study.grace_period=30",  # no heartbeat fails the killed trials: the launcher must
        epochs=4,
        sleep=0.5,
    )
    sweep = Sweep(args, tmp_path)
    killed: list[int] = []
    while len(killed) < kills:
        pid = next_busy_worker(sweep, url, killed)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # the OOM killer, a lost process
        killed.append(pid)
        time.sleep(0.3)
    assert sweep.wait() == 0, sweep.output
    no_traceback(sweep)
    assert sweep.output.count("replaced by a new one") == kills, sweep.output
    study = load(url, "replace")
    assert_consistent(study, n)
    # Failed by the launcher (a retry inherits its trial's attributes, so count FAILs only).
    dead = [
        t
        for t in study.trials
        if t.state == TrialState.FAIL and t.user_attrs.get("interrupted") == "SIGKILL"
    ]
    assert len(dead) == kills, [t.number for t in dead]
    record("worker_replacement", study, workers=WORKERS, kills=kills)


def next_busy_worker(sweep: Sweep, url: str, killed: list[int]) -> int:
    end = time.time() + 120
    while not (busy := busy_workers(sweep, url, killed)):
        assert sweep.proc.poll() is None, f"sweep exited with kills left:\n{sweep.output}"
        assert time.time() < end, f"no busy worker within 120 s:\n{sweep.output}"
        time.sleep(0.2)
    return busy[0]


def busy_workers(sweep: Sweep, url: str, killed: list[int]) -> list[int]:
    """This launcher's live worker processes that run a trial, not killed yet."""
    try:
        running = load(url, "replace").get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    except Exception:  # not created yet, or busy
        return []
    tags = {str(t.user_attrs.get("process", "")) for t in running}
    pids = [int(tag.rsplit(":", 1)[1]) for tag in tags if tag]
    children = sweep.children()
    return [pid for pid in pids if pid in children and pid not in killed]
