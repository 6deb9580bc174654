"""Worker processes on this machine: one per entry of `worker_devices(cfg)`, each running
the worker loop (sweep/worker.py) on the shared study, pinned to its GPU when there are any.

    codes = run_workers(spec, worker_devices(cfg), log_dir, progress, max_restarts)
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import optuna
from omegaconf import DictConfig

from kmnist_sweep.errors import ConfigError
from kmnist_sweep.sweep.faults import STOP_WAIT_S, signum_of, stop_seen
from kmnist_sweep.sweep.progress import Progress
from kmnist_sweep.sweep.storage import STORAGE_ERRORS
from kmnist_sweep.sweep.study import FINISHED
from kmnist_sweep.sweep.worker import fail_trials_of
from kmnist_sweep.sweep.worker_spec import WorkerSpec, to_payload

log = logging.getLogger(__name__)

WORKER_ENTRY = "from kmnist_sweep.sweep.worker import worker_main; worker_main()"


def worker_devices(cfg: DictConfig) -> list[str | None]:
    """One entry per worker: its CUDA_VISIBLE_DEVICES value, or None (CPU / leave as is).

    `study.workers: auto` = one worker per visible GPU x workers_per_gpu, one without GPUs;
    an integer N = N workers, spread round-robin over the GPUs.
    """
    workers = cfg.study.workers
    per_gpu = int(cfg.study.workers_per_gpu)
    gpus = visible_gpus(str(cfg.trainer.device))
    if str(workers) == "auto":
        count = len(gpus) * per_gpu if gpus else 1
    else:
        try:
            count = int(workers)
        except (TypeError, ValueError):
            raise ConfigError(f"study.workers={workers!r} must be auto or an integer") from None
    if count < 1 or per_gpu < 1:
        raise ConfigError(f"study.workers={workers} and workers_per_gpu={per_gpu} must be >= 1")
    if count == 1 and len(gpus) <= 1:
        return [None]  # run in this process; device selection stays with the trainer
    return [gpus[i % len(gpus)] if gpus else None for i in range(count)]


def visible_gpus(device: str = "auto") -> list[str]:
    """CUDA device ids a worker may be pinned to, as CUDA_VISIBLE_DEVICES spells them."""
    if device.startswith("cpu"):
        return []
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        return []
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in env.split(",") if d.strip()] if env else []
    ids = ids[:count] if ids else [str(i) for i in range(count)]
    if device.startswith("cuda:"):
        index = int(device.split(":", 1)[1])
        return [ids[index]] if index < len(ids) else []
    return ids


def run_workers(
    spec: WorkerSpec,
    devices: list[str | None],
    log_dir: Path,
    progress: Progress,
    max_restarts: int,
) -> list[int]:
    """Start one process per entry of `devices`, each a worker of `spec`, show progress until
    all exit; their codes.

    A worker killed by a signal (the OOM killer, a lost process) has its running trial
    failed and retried at once, and is replaced by a new one while the study needs trials,
    at most `max_restarts` times in all: a worker that dies at every start stops there.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    env = worker_env(str(spec.objective), len(devices))
    pool = _Pool(spec, devices, env, log_dir, progress.study)
    try:
        for index in range(len(devices)):
            pool.start(index)
        while True:
            progress.refresh()
            for index in pool.ended():
                if pool.killed(index) and pool.needs_trials(progress.n_trials):
                    pool.replace(index, max_restarts)
            if not pool.alive():
                break
            time.sleep(spec.poll)
    except BaseException as exc:
        stop_seen(exc)
        _stop_workers(pool.procs, forward=signum_of(exc) == signal.SIGTERM)
        pool.ended()  # fail the trials of the ones that had to be killed
        raise
    return [cast(int, p.returncode) for p in pool.procs]


class _Pool:
    """The launcher's worker processes, by index; each ended one is seen once."""

    def __init__(
        self,
        spec: WorkerSpec,
        devices: list[str | None],
        env: dict[str, str],
        log_dir: Path,
        study: optuna.Study,
    ) -> None:
        self.spec, self.devices, self.env, self.log_dir = spec, devices, env, log_dir
        self.study = study
        self.procs: list[subprocess.Popen[bytes]] = []
        self.seen: set[int] = set()  # pids of ended processes already handled
        self.restarts = 0

    def start(self, index: int) -> None:
        own_env = dict(self.env, KMNIST_SWEEP_WORKER=str(index))
        device = self.devices[index]
        if device is not None:
            own_env["CUDA_VISIBLE_DEVICES"] = device
        with open(self.log_dir / f"worker-{index}.log", "ab") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-c", WORKER_ENTRY],
                stdin=subprocess.PIPE,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=own_env,
            )
        if index < len(self.procs):
            self.procs[index] = proc
        else:
            self.procs.append(proc)
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(worker_payload(self.spec, index, device)).encode())
        proc.stdin.close()

    def alive(self) -> bool:
        return any(p.poll() is None for p in self.procs)

    def killed(self, index: int) -> bool:
        """Killed by a signal it did not handle (its own stops exit with a status)."""
        return (self.procs[index].returncode or 0) < 0

    def ended(self) -> list[int]:
        """Indices of processes that ended since the last call; a killed one's trials failed."""
        indices = []
        for index, proc in enumerate(self.procs):
            if proc.poll() is None or proc.pid in self.seen:
                continue
            self.seen.add(proc.pid)
            indices.append(index)
            if self.killed(index):
                signum = -cast(int, proc.returncode)
                try:
                    failed = fail_trials_of(self.study, proc.pid, signum, self.spec.lock_path)
                except STORAGE_ERRORS:
                    failed = 0  # the heartbeat fails them once the storage is back
                log.warning(
                    "worker %d (pid %d) was killed by %s; %d running trial(s) failed and "
                    "queued again",
                    index,
                    proc.pid,
                    signal.Signals(signum).name,
                    failed,
                )
        return indices

    def needs_trials(self, n_trials: int) -> bool:
        try:
            return len(self.study.get_trials(deepcopy=False, states=FINISHED)) < n_trials
        except STORAGE_ERRORS:
            return True  # the new worker waits for the storage as the others do

    def replace(self, index: int, max_restarts: int) -> None:
        if self.restarts >= max_restarts:
            log.warning(
                "worker %d not replaced: launcher.max_worker_restarts=%d reached",
                index,
                max_restarts,
            )
            return
        self.restarts += 1
        self.start(index)
        log.warning(
            "worker %d replaced by a new one (pid %d), restart %d of "
            "launcher.max_worker_restarts=%d",
            index,
            self.procs[index].pid,
            self.restarts,
            max_restarts,
        )


def worker_payload(spec: WorkerSpec, index: int, device: str | None) -> dict[str, Any]:
    """What worker `index`, pinned to `device`, reads on stdin: the sweep's spec as data.

    A worker pinned by CUDA_VISIBLE_DEVICES sees its one GPU as cuda:0, whatever the GPU's
    number here: `trainer.device=cuda:N` (N counted among this process's GPUs) would ask it for
    a GPU it cannot see, so it is told `cuda` instead. Unpinned workers keep the config as is.
    """
    trainer = spec.cfg["trainer"]
    if device is not None and str(trainer["device"]).startswith("cuda:"):
        spec = replace(spec, cfg={**spec.cfg, "trainer": {**trainer, "device": "cuda"}})
    return to_payload(spec, index)


def _stop_workers(procs: list[subprocess.Popen[bytes]], forward: bool = False) -> None:
    """Ctrl-C reached the workers too (same process group): give them time to record it.
    A SIGTERM was sent to this process alone (`forward`): pass it on at once."""
    if forward:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
    end = time.time() + STOP_WAIT_S / 2
    while time.time() < end and any(p.poll() is None for p in procs):
        time.sleep(0.1)
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    end = time.time() + STOP_WAIT_S
    while time.time() < end and any(p.poll() is None for p in procs):
        time.sleep(0.1)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def worker_env(objective_path: str, n_workers: int) -> dict[str, str]:
    """Workers import this package and the objective's from wherever this process did."""
    roots = [os.getcwd(), str(Path(__file__).resolve().parents[2])]
    module = sys.modules.get(objective_path.partition(":")[0])
    if module is not None and getattr(module, "__file__", None):
        depth = module.__name__.count(".") + (Path(str(module.__file__)).name == "__init__.py")
        roots.append(str(Path(str(module.__file__)).resolve().parents[depth]))
    env = dict(os.environ)
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(roots + ([old] if old else [])))
    if n_workers > 1 and "OMP_NUM_THREADS" not in env:
        # Share the cores instead of every worker's torch taking all of them.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n_workers))
    return env
