"""Helpers of the fault-matrix tests: run `python -m kmnist_sweep` as a user does, inject a
fault from outside (signals, a cut network, a full disk), then check what the study holds."""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from kmnist_sweep.sweep.storage import open_storage

REPO = Path(__file__).resolve().parents[2]
TOY = "tests.toy_objective:make_toy_objective"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# Light counts in CI; KMNIST_SWEEP_FAULTS=full runs the counts recorded in docs/operations.md.
FULL = os.environ.get("KMNIST_SWEEP_FAULTS") == "full"
PG_URL = os.environ.get("KMNIST_SWEEP_PG_URL")


def toy_args(*extra: str, epochs: int = 3, sleep: float = 0.05) -> list[str]:
    """A batch-size sweep on the toy objective: real runner, workers and storage, no training."""
    return [
        "+sweep=batchsize",
        "data=synthetic",
        f"debug.objective={TOY}",
        "study.sampler.type=random",
        "study.heartbeat_interval=1",
        "study.grace_period=3",
        "study.poll_interval=0.2",
        "tracking=disabled",
        f"+toy.epochs={epochs}",
        f"+toy.sleep={sleep}",
        *extra,
    ]


class Sweep:
    """`python -m kmnist_sweep ARGS` in its own process group, output to files under cwd."""

    count = 0

    def __init__(
        self,
        args: list[str],
        cwd: Path,
        env: dict[str, str | None] | None = None,
        prefix: list[str] | None = None,
    ) -> None:
        """`prefix` runs it through another command, e.g. `ip netns exec HOST`."""
        Sweep.count += 1
        self.out = cwd / f"sweep-{Sweep.count}.out"
        self.err = cwd / f"sweep-{Sweep.count}.err"
        environ = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
        environ["PYTHONPATH"] = os.pathsep.join([str(REPO), environ.get("PYTHONPATH", "")])
        for key, value in (env or {}).items():
            if value is None:
                environ.pop(key, None)
            else:
                environ[key] = value
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [*(prefix or []), sys.executable, "-m", "kmnist_sweep", *args],
                cwd=cwd,
                env=environ,
                stdout=out,
                stderr=err,
                start_new_session=True,  # its own group: a Ctrl-C reaches it and its workers
            )

    def wait(self, timeout: float = 600) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            message = f"sweep still running after {timeout} s:\n{self.stderr}"
            raise AssertionError(message) from None

    def ctrl_c(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)  # what a terminal sends on Ctrl-C

    def terminate(self) -> None:
        os.kill(self.proc.pid, signal.SIGTERM)  # `kill PID`, or a scheduler stopping the job

    @property
    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    @property
    def output(self) -> str:
        """Both streams: Hydra's logging writes warnings to stdout."""
        return self.stdout + self.stderr

    def children(self) -> list[int]:
        """Worker processes: the sweep's direct children."""
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        with contextlib.suppress(OSError):
            return [int(pid) for pid in path.read_text().split()]
        return []


def run(args: list[str], cwd: Path, env: dict[str, str | None] | None = None) -> Sweep:
    sweep = Sweep(args, cwd, env)
    sweep.wait()
    return sweep


def load(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(url))


def drop_study(url: str, name: str) -> None:
    """Leave the shared PostgreSQL database as we found it."""
    with contextlib.suppress(KeyError):
        optuna.delete_study(study_name=name, storage=open_storage(url))


def states(study: optuna.Study) -> collections.Counter[str]:
    return collections.Counter(t.state.name for t in study.get_trials(deepcopy=False))


def finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def wait_until(test: Callable[[], bool], timeout: float, what: str, sweep: Sweep) -> None:
    end = time.time() + timeout
    while not test():
        assert sweep.proc.poll() is None, f"sweep exited before {what}:\n{sweep.stderr}"
        assert time.time() < end, f"no {what} within {timeout} s:\n{sweep.stderr}"
        time.sleep(0.2)


def finished_at_least(url: str, name: str, n: int) -> Callable[[], bool]:
    def test() -> bool:
        try:
            return finished(load(url, name)) >= n
        except (KeyError, Exception):  # not created yet, or busy
            return False

    return test


def unexplained_failures(study: optuna.Study) -> list[FrozenTrial]:
    """Failed trials with no recorded cause. Every failure must say why: an error, a signal,
    a lost storage, a slot it stood down from, or a dead worker (its retry points at it)."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs.get("failed_trial") for t in trials}
    reasons = ("error", "interrupted", "storage_error", "surplus")
    return [
        t
        for t in trials
        if t.state == TrialState.FAIL
        and not any(k in t.user_attrs for k in reasons)
        and t.number not in retried
    ]


def record(test: str, study: optuna.Study, **figures: object) -> None:
    """One `FAULTS ...` line (shown with `pytest -s`): the figures of docs/operations.md.
    Call it after assert_consistent, which is what makes "lost 0" true."""
    extra = " ".join(f"{k}={v}" for k, v in figures.items())
    print(f"FAULTS {test}: {dict(states(study))} {extra}", flush=True)


def assert_consistent(study: optuna.Study, n_trials: int) -> None:
    """Nothing lost: the total reached exactly, nothing left running, every failure explained."""
    counts = states(study)
    assert finished(study) == n_trials, counts
    assert counts["RUNNING"] == 0 and counts["WAITING"] == 0, counts
    assert not unexplained_failures(study), [t.number for t in unexplained_failures(study)]


def no_traceback(sweep: Sweep) -> None:
    assert "Traceback" not in sweep.stderr and "Traceback" not in sweep.stdout, sweep.stderr


def last_line(sweep: Sweep) -> str:
    lines = [line for line in sweep.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proxy:
    """A TCP forwarder to PostgreSQL that a test can cut and restore: the storage becoming
    unreachable mid-sweep, as a network or a database restart would make it."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.server: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        self.server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self.server,), daemon=True).start()

    def cut(self) -> None:
        """Refuse new connections and drop every open one."""
        if self.server is not None:
            self.server.close()
            self.server = None
        with self.lock:
            for conn in self.conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self.conns.clear()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def small_tmpfs(path: Path, size_kb: int, options: str = "rw") -> Iterator[bool]:
    """A size-limited filesystem at `path` (True), or False where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"{options},size={size_kb}k", "tmpfs", str(path)],
            capture_output=True,
        ).returncode
        == 0
    )
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(path: Path) -> Path:
    """Write zeros under `path` until the filesystem is full; the filler file."""
    filler = path / "filler.bin"
    with contextlib.suppress(OSError), open(filler, "wb") as f:
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    return filler
