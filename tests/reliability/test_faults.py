"""The fault matrix: real sweeps under faults, each checking that nothing stored is lost.

Every test runs `python -m kmnist_sweep` in processes of its own, injects one fault from
outside (a signal, a cut connection, a full disk, a failing objective, an unreachable W&B)
and then reads the study back: the total is reached (now, or by running the same command
again), nothing is left running, and every failed trial says why.

Light counts in CI; `KMNIST_SWEEP_FAULTS=full python -m pytest -m reliability` runs the
counts recorded in docs/operations.md.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.reliability.harness import (
    FULL,
    PG_URL,
    Proxy,
    Sweep,
    assert_consistent,
    drop_study,
    fill,
    finished,
    finished_at_least,
    free_port,
    last_line,
    load,
    no_traceback,
    record,
    run,
    small_tmpfs,
    states,
    toy_args,
    unexplained_failures,
    wait_until,
)

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

NAME = "batchsize-synthetic"  # +sweep=batchsize data=synthetic
SQLITE = f"sqlite:///storage/{NAME}.db"
needs_pg = pytest.mark.skipif(not PG_URL, reason="KMNIST_SWEEP_PG_URL is not set")
# The real objective on the in-memory synthetic set: trains ResNet-18 for a few seconds.
REAL = ["+sweep=batchsize", "data=synthetic", "trainer.epochs=1", "tracking=disabled"]
REAL += ["batch_size.min_steps=0"]  # one epoch per size, not the sweep's 100 steps
REAL += ["study.report=false", "study.heartbeat_interval=1", "study.grace_period=3"]
REAL += ["++search_space.trainer.lr=null"]  # the fixed trainer.lr, not the LR finder's


def sqlite(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'storage' / f'{NAME}.db'}"


# --------------------------------------------------------------------------- many workers


def test_eight_workers_share_one_sqlite_file_while_the_dashboard_reads(tmp_path: Path) -> None:
    n = 200 if FULL else 40
    sweep = Sweep(
        toy_args(f"study.n_trials={n}", "study.workers=8", epochs=2, sleep=0.02), tmp_path
    )
    db = tmp_path / "storage" / f"{NAME}.db"
    wait_until(db.exists, 120, "database file", sweep)
    reads = DashboardReader(f"sqlite:///{db}", tmp_path / "dashboard.log")
    try:
        assert sweep.wait() == 0, sweep.stderr
        final = reads.detail()
    finally:
        reads.stop()
    study = load(sqlite(tmp_path), NAME)
    assert_consistent(study, n)
    # The only failures allowed: trials that two workers raced for and that stood down.
    assert all(t.user_attrs.get("surplus") for t in study.trials if t.state == TrialState.FAIL)
    for log in (tmp_path / "sweeps" / NAME / "logs").glob("worker-*.log"):
        text = log.read_text()
        assert "database is locked" not in text and "Traceback" not in text, log
    assert reads.ok >= 3 and reads.errors == [], (reads.ok, reads.errors)
    assert sum(t["state"] in ("Complete", "Pruned") for t in final["trials"]) == n
    record("8 workers, 1 SQLite file, dashboard", study, dashboard_reads=reads.ok)


class DashboardReader:
    """optuna-dashboard on the same file, its API polled from a thread until stop()."""

    def __init__(self, url: str, log_path: Path) -> None:
        exe = shutil.which("optuna-dashboard")
        if exe is None:
            pytest.skip("optuna-dashboard is not on PATH")
        self.base = f"http://127.0.0.1:{free_port()}"
        port = self.base.rsplit(":", 1)[1]
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [exe, url, "--host", "127.0.0.1", "--port", port], stdout=log, stderr=log
            )
        self.ok, self.errors = 0, []  # type: tuple[int, list[str]]
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _get(self, path: str) -> dict:  # type: ignore[type-arg]
        with urllib.request.urlopen(self.base + path, timeout=30) as response:
            return json.load(response)  # type: ignore[no-any-return]

    def detail(self) -> dict:  # type: ignore[type-arg]
        (study,) = [s for s in self._get("/api/studies")["study_summaries"]]
        return self._get(f"/api/studies/{study['study_id']}?after=0")

    def _poll(self) -> None:
        started = False  # before its first answer the server is still starting
        while not self.done.is_set():
            try:
                self.detail()
                self.ok += 1
                started = True
            except Exception as exc:
                if started:
                    self.errors.append(repr(exc))
            time.sleep(0.2)

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=30)
        self.proc.terminate()
        self.proc.wait(timeout=10)


# --------------------------------------------------------------------------- signals


def test_sigkill_of_a_worker_mid_trial_is_retried(tmp_path: Path) -> None:
    n = 60 if FULL else 12
    sweep = Sweep(toy_args(f"study.n_trials={n}", "study.workers=3", sleep=0.3), tmp_path)
    url = sqlite(tmp_path)
    wait_until(finished_at_least(url, NAME, 2), 180, "2 finished trials", sweep)
    # Kill a worker whose trial is mid-way (it reported an epoch); which trial died is read
    # after the kill, since the worker may have moved on to its next trial meanwhile.
    killed, _ = _signal_a_worker_mid_trial(sweep, url, signal.SIGKILL)
    assert sweep.wait() == 0, sweep.stderr
    study = load(url, NAME)
    assert_consistent(study, n)
    trials = {t.number: t for t in study.trials}
    # Its one failed trial is the victim (a replacement under its index runs others).
    failed = [
        t.number
        for t in trials.values()
        if t.user_attrs.get("worker") == killed and t.state == TrialState.FAIL
    ]
    assert len(failed) == 1, (killed, {t.number: t.state.name for t in trials.values()})
    victim = failed[0]
    assert not {"error", "surplus"} & set(trials[victim].user_attrs)
    assert trials[victim].user_attrs.get("interrupted") in (None, "SIGKILL")  # as its launcher saw
    retries = [t for t in trials.values() if t.system_attrs.get("failed_trial") == victim]
    assert len(retries) == 1 and retries[0].params == trials[victim].params
    record("SIGKILL of a worker", study, killed_trial=victim)


def test_a_worker_paused_past_the_grace_period_goes_on(tmp_path: Path) -> None:
    """A worker stopped mid-trial for longer than the grace period (a loaded machine, a
    heartbeat thread that died): another worker fails its trial as stale and queues it
    again. Resumed, the worker finds its trial failed, drops it and takes the next one."""
    n = 8
    sweep = Sweep(toy_args(f"study.n_trials={n}", "study.workers=2", sleep=0.3), tmp_path)
    url = sqlite(tmp_path)
    wait_until(finished_at_least(url, NAME, 2), 180, "2 finished trials", sweep)
    index, pid = _signal_a_worker_mid_trial(sweep, url, signal.SIGSTOP)
    try:
        [victim] = [  # read once it is stopped: the trial it holds now
            t.number
            for t in load(url, NAME).trials
            if t.state == TrialState.RUNNING and t.user_attrs.get("worker") == index
        ]
        failed = lambda: load(url, NAME).trials[victim].state == TrialState.FAIL  # noqa: E731
        wait_until(failed, 60, f"trial {victim} failed as stale", sweep)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert sweep.wait() == 0, sweep.stderr
    study = load(url, NAME)
    assert_consistent(study, n)
    trials = study.trials
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim]
    assert len(retries) == 1 and retries[0].params == trials[victim].params
    log = (tmp_path / "sweeps" / NAME / "logs" / f"worker-{index}.log").read_text()
    assert "Traceback" not in log, log[-3000:]
    # The same process went on to the end: never replaced, and it says it is done.
    assert log.count("joins study") == 1 and f"worker {index} done" in log, log[-3000:]
    no_traceback(sweep)
    record("worker paused past the grace period", study, stale_trial=victim)


def test_a_retry_whose_worker_died_before_its_first_heartbeat_is_retried(tmp_path: Path) -> None:
    """A retry carries the attributes of the trial it retries. Its worker took it from the
    queue and died before its first heartbeat: no heartbeat goes stale, so the stale check
    must still fail it after the grace period and queue it again, or it holds a slot for
    ever and the sweep never ends."""
    assert run(toy_args("study.n_trials=2"), tmp_path).proc.returncode == 0
    study = load(sqlite(tmp_path), NAME)
    done = study.trials[0]
    study.add_trial(  # as Optuna's retry callback queues a retry of trial 0
        optuna.trial.create_trial(
            state=TrialState.WAITING,
            params=done.params,
            distributions=done.distributions,
            user_attrs=done.user_attrs,
            system_attrs={"failed_trial": 0, "retry_history": [0]},
        )
    )
    taken = study.ask()  # a worker takes it, then dies: nothing more is written
    sweep = Sweep(toy_args("study.n_trials=3"), tmp_path)
    assert sweep.wait(timeout=120) == 0, sweep.stderr
    study = load(sqlite(tmp_path), NAME)
    assert_consistent(study, 3)
    lost = study.trials[taken.number]
    assert lost.state == TrialState.FAIL and lost.user_attrs["storage_error"] == "never started"
    # Optuna names the first trial of a retry chain as `failed_trial`, then each it retried.
    retries = [t for t in study.trials if t.system_attrs.get("retry_history") == [0, lost.number]]
    assert len(retries) == 1 and retries[0].params == done.params
    no_traceback(sweep)


def _signal_a_worker_mid_trial(sweep: Sweep, url: str, sig: signal.Signals) -> tuple[str, int]:
    """Send `sig` to a worker whose trial has reported an epoch: (its index, its pid)."""
    while True:
        for t in load(url, NAME).trials:
            worker = t.user_attrs.get("worker")
            if t.state != TrialState.RUNNING or not t.intermediate_values or worker is None:
                continue
            pid = _worker_pid(sweep, str(worker))
            if pid is not None:
                os.kill(pid, sig)
                return str(worker), pid
        time.sleep(0.05)


def _worker_pid(sweep: Sweep, index: str) -> int | None:
    for pid in sweep.children():
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"KMNIST_SWEEP_WORKER={index}".encode() in env:
            return pid
    return None


@pytest.mark.parametrize(
    ("how", "workers"),
    [("ctrl-c", 3), ("sigterm", 3), ("sigterm", 1)] + ([("ctrl-c", 1)] if FULL else []),
)
def test_a_stopped_sweep_records_its_trials_and_a_rerun_resumes(
    tmp_path: Path, how: str, workers: int
) -> None:
    n = 60 if FULL else 20
    args = toy_args(f"study.n_trials={n}", f"study.workers={workers}", sleep=0.3)
    sweep = Sweep(args, tmp_path)
    url = sqlite(tmp_path)
    wait_until(finished_at_least(url, NAME, 4), 180, "4 finished trials", sweep)
    children = sweep.children()
    sweep.ctrl_c() if how == "ctrl-c" else sweep.terminate()
    code = sweep.wait(timeout=120)
    assert code == (130 if how == "ctrl-c" else 143), sweep.stderr
    word = "interrupted" if how == "ctrl-c" else "terminated"
    assert last_line(sweep).startswith(f"kmnist_sweep: interrupted: study {NAME} {word} at ")
    assert "run the same command again to resume" in last_line(sweep)
    no_traceback(sweep)
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists()], "worker left behind"
    study = load(url, NAME)
    stopped_at = finished(study)
    assert 4 <= stopped_at < n
    assert states(study)["RUNNING"] == 0, states(study)  # failed cleanly, not left running
    assert not unexplained_failures(study)
    assert any("interrupted" in t.user_attrs for t in study.trials), "no trial was cut short"

    again = run(args, tmp_path)
    assert again.proc.returncode == 0, again.stderr
    assert_consistent(load(url, NAME), n)
    record(f"{how}, {workers} worker(s)", load(url, NAME), finished_when_stopped=stopped_at)


# --------------------------------------------------------------------------- training faults


def test_out_of_memory_at_random_steps_every_trial_completes_at_a_halved_batch(
    tmp_path: Path,
) -> None:
    n = 8 if FULL else 3
    args = REAL + [
        f"study.n_trials={n}",
        "study.sampler.type=random",
        "++search_space.trainer.batch_size.low=64",
        "++search_space.trainer.batch_size.high=256",
        "debug.inject_oom={above: 32}",  # every batch above 32 "runs out" at a random step
    ]
    sweep = run(args, tmp_path)
    assert sweep.proc.returncode == 0, sweep.stderr
    study = load(sqlite(tmp_path), NAME)
    assert_consistent(study, n)
    assert states(study) == {"COMPLETE": n}
    steps = set()
    for t in study.trials:
        halvings = t.user_attrs["batch_size/halvings"]
        assert t.user_attrs["batch_size/effective"] == 32
        assert [h["cause"] for h in halvings] == ["oom"] * len(halvings) and halvings
        assert [h["to_bs"] for h in halvings][-1] == 32
        assert "trainer.batch_size=32" in t.user_attrs["overrides"]
        steps |= {h["detail"] for h in halvings}
    assert all("injected out of memory at epoch 1 step" in s for s in steps)
    record(
        "OOM at random steps",
        study,
        ooms=sum(len(t.user_attrs["batch_size/halvings"]) for t in study.trials),
    )


def test_a_diverging_loss_prunes_the_trial_with_its_reason(tmp_path: Path) -> None:
    args = REAL + [
        "study.n_trials=2",
        "trainer.lr=1.0e+6",  # per step: certain to blow up
        "++search_space.trainer.batch_size.low=32",
        "++search_space.trainer.batch_size.high=64",
    ]
    sweep = run(args, tmp_path)
    assert sweep.proc.returncode == 0, sweep.stderr
    study = load(sqlite(tmp_path), NAME)
    assert_consistent(study, 2)
    assert states(study) == {"PRUNED": 2}
    for t in study.trials:
        assert t.user_attrs["reason"].startswith("diverged at batch 16 (")
        assert "halving would go below batch_size.min=16" in t.user_attrs["reason"]
        causes = [h["cause"] for h in t.user_attrs["batch_size/halvings"]]
        assert causes and set(causes) == {"diverged"}
    no_traceback(sweep)


def test_an_exception_in_training_fails_only_that_trial(tmp_path: Path) -> None:
    args = toy_args("study.n_trials=10", "+toy.raise_trials=[1,4]")
    sweep = run(args, tmp_path)
    assert sweep.proc.returncode == 0, sweep.stderr
    study = load(sqlite(tmp_path), NAME)
    assert_consistent(study, 10)
    failed = {t.number: t.user_attrs["error"] for t in study.trials if t.state == TrialState.FAIL}
    assert failed == {
        1: "RuntimeError: toy failure in trial 1",
        4: "RuntimeError: toy failure in trial 4",
    }


def test_an_objective_that_always_fails_stops_the_sweep(tmp_path: Path) -> None:
    args = toy_args("study.n_trials=10", "study.max_failed=3", "+toy.raise_trials=all")
    sweep = run(args, tmp_path)
    assert sweep.proc.returncode == 1, sweep.stderr
    assert last_line(sweep) == (
        "kmnist_sweep: stopped: 3 trials failed with an error in this run (study.max_failed=3);"
        " last, trial 2: RuntimeError: toy failure in trial 2; fix the cause and run the same"
        " command again"
    )
    study = load(sqlite(tmp_path), NAME)
    assert states(study) == {"FAIL": 3} and not unexplained_failures(study)


def test_a_wandb_outage_costs_no_trial(tmp_path: Path) -> None:
    key = "0123456789abcdef" * 2 + "01234567"
    env = {
        "WANDB_MODE": None,
        "WANDB_API_KEY": key,
        "WANDB_BASE_URL": f"http://127.0.0.1:{free_port()}",  # nothing listens there
    }
    args = REAL + ["study.n_trials=2", "tracking=online", "tracking.init_timeout=5"]
    args += [
        "++search_space.trainer.batch_size.low=64",
        "++search_space.trainer.batch_size.high=128",
    ]
    sweep = run(args, tmp_path, env)
    assert sweep.proc.returncode == 0, sweep.stderr
    assert_consistent(load(sqlite(tmp_path), NAME), 2)
    assert sweep.output.count("wandb is unreachable") == 1, sweep.output  # then offline
    assert "wandb teardown failed" not in sweep.output
    runs = list((tmp_path / "sweeps" / NAME / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and key.encode() in p.read_bytes()]
    assert not leaked


# --------------------------------------------------------------------------- disk


def test_a_full_output_dir_loses_no_trial(tmp_path: Path) -> None:
    args = REAL + ["study.n_trials=3"]
    args += [
        "++search_space.trainer.batch_size.low=64",
        "++search_space.trainer.batch_size.high=256",
    ]
    sweeps = tmp_path / "sweeps"
    with small_tmpfs(sweeps, 2048) as mounted:
        if not mounted:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        sweep = Sweep(args, tmp_path)
        url = sqlite(tmp_path)
        wait_until(finished_at_least(url, NAME, 1), 300, "1 finished trial", sweep)
        filler = fill(sweeps)
        assert sweep.wait() == 0, sweep.stderr
        no_traceback(sweep)
        assert "could not save predictions" in sweep.output  # trials 1 and 2
        assert f"could not write sweeps/{NAME}: OSError: [Errno 28]" in sweep.output
        assert_consistent(load(url, NAME), 3)
        # Space again: the same command finds the study complete and writes its outputs.
        filler.unlink()
        again = run(args, tmp_path)
        assert again.proc.returncode == 0, again.stderr
        rows = (sweeps / NAME / "trials.csv").read_text().strip().splitlines()
        assert len(rows) == 1 + 3


def test_a_read_only_output_dir_is_one_line_before_the_study_is_touched(
    tmp_path: Path,
) -> None:
    with small_tmpfs(tmp_path / "sweeps", 64, "ro") as mounted:
        if not mounted:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        sweep = run(toy_args("study.n_trials=3"), tmp_path)
    assert sweep.proc.returncode == 2, sweep.stderr
    line = last_line(sweep)
    assert line.startswith("kmnist_sweep: error: hydra.run.dir='sweeps/_runs/"), sweep.stderr
    assert line.endswith("cannot be created: sweeps takes no new folders (Read-only file system)")
    no_traceback(sweep)
    assert not (tmp_path / "storage").exists()


# --------------------------------------------------------------------------- storage


@pytest.fixture
def pg_study() -> Iterator[tuple[Proxy, str, str]]:
    """(proxy to the local PostgreSQL, URL through it, a fresh study name); study dropped after."""
    assert PG_URL is not None
    from sqlalchemy.engine import make_url

    target = make_url(PG_URL)
    proxy = Proxy((target.host or "127.0.0.1", target.port or 5432))
    url = target.set(port=proxy.port).render_as_string(hide_password=False)
    name = f"faults-{uuid.uuid4().hex[:10]}"
    yield proxy, url, name
    drop_study(PG_URL, name)  # directly, not through the proxy a test may have cut
    proxy.cut()


@pytest.mark.postgres
@needs_pg
def test_storage_lost_mid_sweep_reconnects(
    tmp_path: Path, pg_study: tuple[Proxy, str, str]
) -> None:
    proxy, url, name = pg_study
    n = 60 if FULL else 16
    args = toy_args(f"study.n_trials={n}", "study.workers=2", f"study.name={name}", sleep=0.2)
    args.append(f"study.storage='{url}'")
    sweep = Sweep(args, tmp_path)
    assert PG_URL is not None
    wait_until(finished_at_least(PG_URL, name, 4), 180, "4 finished trials", sweep)
    proxy.cut()
    time.sleep(4)  # longer than the heartbeat grace period
    proxy.restore()
    assert sweep.wait() == 0, sweep.stderr
    assert_consistent(load(PG_URL, name), n)
    logs = "".join(p.read_text() for p in (tmp_path / "sweeps").rglob("worker-*.log"))
    assert "storage unreachable" in logs  # the cut did hit the workers
    record("PostgreSQL cut for 4 s", load(PG_URL, name))


@pytest.mark.postgres
@needs_pg
def test_storage_lost_for_good_stops_cleanly_and_resumes(
    tmp_path: Path, pg_study: tuple[Proxy, str, str]
) -> None:
    proxy, url, name = pg_study
    n = 30
    args = toy_args(f"study.n_trials={n}", f"study.name={name}", "study.storage_patience=5")
    args += [f"study.storage='{url}'"]
    sweep = Sweep(args, tmp_path)
    assert PG_URL is not None
    wait_until(finished_at_least(PG_URL, name, 3), 180, "3 finished trials", sweep)
    proxy.cut()
    before = finished(load(PG_URL, name))
    assert sweep.wait(timeout=120) == 1, sweep.stderr
    stop = "kmnist_sweep: stopped: the storage did not answer for "
    assert last_line(sweep).startswith(stop), sweep.stderr
    no_traceback(sweep)
    assert finished(load(PG_URL, name)) >= before  # nothing finished was lost
    proxy.restore()
    again = run(args, tmp_path)
    assert again.proc.returncode == 0, again.stderr
    assert_consistent(load(PG_URL, name), n)


# --------------------------------------------------------------------------- secrets


@pytest.mark.postgres
@needs_pg
def test_secrets_appear_in_no_log_output_or_run(tmp_path: Path) -> None:
    assert PG_URL is not None
    from sqlalchemy.engine import make_url

    password = f"pw-{uuid.uuid4().hex}"  # trust auth: the server accepts any password
    key = uuid.uuid4().hex + "abcdefgh"
    url = make_url(PG_URL).set(password=password).render_as_string(hide_password=False)
    name = f"secrets-{uuid.uuid4().hex[:10]}"
    args = REAL + ["study.n_trials=2", "study.workers=2", "tracking=offline"]
    args += [f"study.name={name}", f"study.storage='{url}'"]
    args += [
        "++search_space.trainer.batch_size.low=64",
        "++search_space.trainer.batch_size.high=128",
    ]
    try:
        sweep = run(args, tmp_path, {"WANDB_MODE": "offline", "WANDB_API_KEY": key})
        assert sweep.proc.returncode == 0, sweep.stderr
        study = load(PG_URL, name)
        assert finished(study) == 2
        assert list(tmp_path.rglob("offline-run-*")), "no wandb runs to check"
        stored = json.dumps([study.user_attrs, [t.user_attrs for t in study.trials]])
        for secret in (password, key):
            assert secret not in sweep.stdout + sweep.stderr + stored
            leaked = [
                p for p in tmp_path.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()
            ]
            assert not leaked, leaked
        assert "***" in (tmp_path / "sweeps" / name / "config.yaml").read_text()
    finally:
        drop_study(PG_URL, name)
