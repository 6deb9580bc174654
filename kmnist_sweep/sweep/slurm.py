"""Worker jobs through submitit: `launcher=slurm` runs a study's workers as cluster jobs.

    jobs = submit_workers(cfg, spec)       # spec: sweep/worker_spec.py, as run_sweep made it
    status = wait(jobs, progress, poll)    # one per job: 0 = it ended well

Why not Hydra's submitit launcher plugin: it runs one job per config of a multirun, while a
study wants N identical workers that share its storage and take trials from it until the
total is reached. Each job runs `worker.worker_run`, the loop of the runner's local worker
processes, so a job that dies costs only its running trial (failed by heartbeat, retried by
another worker). `debug.executor=local` is submitit's LocalExecutor: the same job code, run as
processes on this machine. Job states come from `squeue` and the jobs' result files, not
`sacct`, which needs SLURM's accounting database (slurmdbd) that many clusters lack.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

from omegaconf import DictConfig, OmegaConf

from kmnist_sweep.errors import ConfigError
from kmnist_sweep.sweep import faults
from kmnist_sweep.sweep.local import worker_env
from kmnist_sweep.sweep.progress import Progress
from kmnist_sweep.sweep.worker import worker_run
from kmnist_sweep.sweep.worker_spec import WorkerSpec, from_payload, to_payload

if TYPE_CHECKING:
    from submitit import AutoExecutor, Job

log = logging.getLogger(__name__)

SLURM_OPTIONS = ("partition", "account", "qos", "constraint")  # null = the cluster's default


def check(cfg: DictConfig) -> int:
    """The number of worker jobs, once this machine can submit them: submitit installed, and
    SLURM here for `debug.executor=slurm` (the values were checked with the whole config)."""
    executor = str(cfg.debug.executor)
    jobs = int(cfg.launcher.jobs)
    submitit = _import_submitit()
    if executor == "slurm" and submitit.SlurmExecutor.affinity() <= 0:
        raise ConfigError(
            "launcher=slurm: no SLURM here (srun not found); run this on a login node, or "
            "set debug.executor=local to run the jobs on this machine"
        )
    return jobs


def slurm_parameters(launcher_cfg: DictConfig) -> dict[str, Any]:
    """Our launcher config as keyword arguments of submitit's `update_parameters`."""
    params: dict[str, Any] = {
        "name": str(launcher_cfg.job_name),
        "nodes": 1,
        "tasks_per_node": 1,  # one worker process per job
        "gpus_per_node": int(launcher_cfg.gpus_per_job),
        "timeout_min": int(launcher_cfg.timeout_min),
    }
    if launcher_cfg.get("cpus_per_task") is not None:
        params["cpus_per_task"] = int(launcher_cfg.cpus_per_task)
    if launcher_cfg.get("mem_gb") is not None:
        params["mem_gb"] = float(launcher_cfg.mem_gb)
    for key in SLURM_OPTIONS:
        if launcher_cfg.get(key) is not None:
            params[f"slurm_{key}"] = str(launcher_cfg[key])
    extra = launcher_cfg.additional_parameters
    if extra:
        params["slurm_additional_parameters"] = cast(
            dict[str, Any], OmegaConf.to_container(extra, resolve=True)
        )
    return params


def submit_workers(cfg: DictConfig, spec: WorkerSpec) -> list[Job[None]]:
    """Submit `launcher.jobs` jobs; job i runs worker i (sampler seed + i) of `spec`."""
    launcher_cfg = cfg.launcher
    count = check(cfg)
    executor = _make_executor(launcher_cfg, str(cfg.debug.executor))
    local = str(cfg.debug.executor) == "local"
    # Jobs import this package and the objective's module from where this process did; local
    # jobs share this machine's cores (OMP_NUM_THREADS), cluster jobs have their own.
    env = worker_env(str(spec.objective), count if local else 1)
    with _environ(env), executor.batch():  # on SLURM: one job array
        jobs = [executor.submit(run_job, to_payload(spec, i)) for i in range(count)]
    log.info(
        "submitted %d worker job(s) (%s): %s; logs in %s",
        count,
        cfg.debug.executor,
        " ".join(job.job_id for job in jobs),
        executor.folder,
    )
    return jobs


def run_job(payload: dict[str, Any]) -> None:
    """What each job runs: the runner's worker loop, as the worker of its payload
    (worker_spec.to_payload: plain data in the job's pickle)."""
    import submitit

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    spec, index = from_payload(payload)
    os.environ["KMNIST_SWEEP_WORKER"] = str(index)  # the `worker` user attribute of its trials
    env = submitit.JobEnvironment()
    log.info(
        "worker %d is job %s on %s (CUDA_VISIBLE_DEVICES=%s)",
        index,
        env.job_id,
        env.hostname,
        os.environ.get("CUDA_VISIBLE_DEVICES", ""),
    )
    # submitit asks SLURM for USR2 some time before the time limit and, on it, requeues a job
    # it takes for preempted: with a short --time it comes at once. A worker needs neither:
    # at the limit SLURM's SIGTERM fails the running trial, and another worker retries it.
    signal.signal(signal.SIGUSR2, _near_time_limit)
    try:
        worker_run(spec, index)
    except SystemExit as exc:  # interrupted or stopped: the job failed, the reason is logged
        if exc.code:
            raise RuntimeError(f"worker {index} exited with status {exc.code}") from None


def _near_time_limit(signum: int, _frame: Any) -> None:
    log.info(
        "%s: the job's time limit is near; the running trial goes on", signal.Signals(signum).name
    )


def wait(jobs: Sequence[Job[None]], progress: Progress, poll: float) -> list[int]:
    """Show progress until every job has ended; per job 0 (ended well) or 1 (failed, its log
    named in an error line). On Ctrl-C or an error here, running jobs are cancelled first."""
    try:
        while not all(ended(jobs)):
            progress.refresh()
            time.sleep(poll)
    except BaseException as exc:
        faults.stop_seen(exc)  # a Ctrl-C: later signals must not cut the cancelling short
        cancel(jobs)
        raise
    return [_status(index, job) for index, job in enumerate(jobs)]


def cancel(jobs: Sequence[Job[None]]) -> None:
    """Stop the jobs still running. Ctrl-C reached local jobs too (same process group): they
    get time to record their trials first. SLURM jobs get scancel's SIGTERM, which the
    worker handles as Ctrl-C; a job killed anyway leaves its trial to the heartbeat."""
    import submitit

    if any(isinstance(job, submitit.LocalJob) for job in jobs):
        _wait_done(jobs, faults.STOP_WAIT_S / 2)
    for job, done in zip(jobs, ended(jobs), strict=True):
        if not done:
            with contextlib.suppress(Exception):  # ended meanwhile, or scancel failed
                job.cancel(check=False)
    _wait_done(jobs, faults.STOP_WAIT_S)


def ended(jobs: Sequence[Job[None]]) -> list[bool]:
    """Whether each job has ended. SLURM jobs: their result file, or gone from `squeue`.
    submitit asks `sacct`, which needs SLURM's accounting database: a cluster without one
    answers nothing, and a job killed before it wrote its result would never end."""
    import submitit

    if not any(isinstance(job, submitit.SlurmJob) for job in jobs):
        return [job.done() for job in jobs]
    queued = _queued()
    return [
        job.paths.result_pickle.exists() or (queued is not None and job.job_id not in queued)
        for job in jobs
    ]


def _queued() -> set[str] | None:
    """Ids (array tasks as 123_4) of this user's jobs SLURM still holds; None if unknown."""
    command = ["squeue", "--noheader", "--array", "--format=%i", f"--user={getpass.getuser()}"]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError):
        return None  # squeue down for a moment: ask again at the next poll
    return set(out.stdout.split())


def _status(index: int, job: Job[None]) -> int:
    if not job.paths.result_pickle.exists():  # killed: scancel, its time limit, its node
        log.error(
            "worker job %d (%s) ended without a result (cancelled or stopped at its time "
            "limit); its running trial is retried; its log: %s",
            index,
            job.job_id,
            job.paths.stderr,
        )
        return 1
    error = job.exception()
    if error is None:
        return 0
    log.error(
        "worker job %d (%s) failed: %s; its log: %s",
        index,
        job.job_id,
        _reason(error),
        job.paths.stderr,
    )
    return 1


def _reason(error: BaseException) -> str:
    """The last line of the traceback inside submitit's many-line job error."""
    lines = str(error).splitlines()
    rules = [i for i, line in enumerate(lines) if line.startswith("-----")]
    body = lines[rules[0] + 1 : rules[-1]] if len(rules) >= 2 else lines
    body = [line.strip() for line in body if line.strip()]
    return body[-1] if body else type(error).__name__


def _wait_done(jobs: Sequence[Job[None]], seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end and not all(ended(jobs)):
        time.sleep(0.5)


def _make_executor(launcher_cfg: DictConfig, cluster: str) -> AutoExecutor:
    submitit = _import_submitit()
    folder = Path(str(launcher_cfg.folder))
    if not folder.exists():  # job pickles hold the resolved config, storage URL included
        folder.mkdir(parents=True, mode=0o700)
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    try:
        executor.update_parameters(**slurm_parameters(launcher_cfg))
    except (AssertionError, NameError, TypeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"launcher: submitit refused the job parameters: {first}") from None
    return cast("AutoExecutor", executor)


def _import_submitit() -> ModuleType:
    try:
        import submitit
    except ImportError:
        raise ConfigError(
            "launcher=slurm needs submitit: pip install 'kmnist_sweep[slurm]'"
        ) from None
    return submitit


@contextmanager
def _environ(env: dict[str, str]) -> Iterator[None]:
    """os.environ as `env` while jobs are submitted: submitit and sbatch pass it on."""
    changed = {key: value for key, value in env.items() if os.environ.get(key) != value}
    old = {key: os.environ.get(key) for key in changed}
    os.environ.update(changed)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
