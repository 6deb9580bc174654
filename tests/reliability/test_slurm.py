"""`launcher=slurm` on a real SLURM: the workers are a job array submitted with `sbatch`,
sharing one PostgreSQL study, and SLURM's own faults: `scancel` of one job mid-trial, a job
stopped at its `--time` limit, every job cancelled. `bash .ci/slurm` starts a single-node
SLURM on this machine; without one these tests skip.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from optuna.trial import TrialState

from tests.conftest import SHOWN
from tests.reliability.harness import (
    PG_URL,
    Sweep,
    assert_consistent,
    drop_study,
    finished_at_least,
    load,
    no_traceback,
    record,
    run,
    states,
    toy_args,
    unexplained_failures,
    wait_until,
)


def _slurm_missing() -> str | None:
    if shutil.which("sbatch") is None:
        return "no sbatch here: `bash .ci/slurm` installs and starts a single-node SLURM (root)"
    try:
        up = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    except OSError:
        return "sbatch but no sinfo here: install slurm-client"
    if up.returncode != 0 or not up.stdout.strip():
        return "SLURM is not running: `bash .ci/slurm` starts it (root)"
    if not PG_URL:
        return "KMNIST_SWEEP_PG_URL is not set: the jobs share a PostgreSQL study"
    return None


MISSING = _slurm_missing()
pytestmark = [
    pytest.mark.slurm,
    pytest.mark.postgres,
    pytest.mark.reliability,
    pytest.mark.slow,
    pytest.mark.skipif(MISSING is not None, reason=str(MISSING)),
]


@pytest.fixture
def study_name() -> Iterator[str]:
    name = f"slurm-{uuid.uuid4().hex[:8]}"
    yield name
    assert PG_URL is not None
    drop_study(PG_URL, name)


def slurm_args(name: str, n: int, jobs: int, *extra: str, sleep: float = 0.3) -> list[str]:
    return toy_args(
        f"study.n_trials={n}",
        f"study.name={name}",
        f"study.storage='{PG_URL}'",
        "launcher=slurm",
        f"launcher.jobs={jobs}",
        "launcher.gpus_per_job=0",
        "launcher.cpus_per_task=1",
        "launcher.mem_gb=null",
        *extra,
        epochs=3,
        sleep=sleep,
    )


def job_ids(sweep: Sweep, record_property: Callable[[str, object], None]) -> list[str]:
    """The sbatch job ids the launcher printed (array tasks, as 123_0), also shown in the
    summary of the test run."""
    match = re.search(r"submitted \d+ worker job\(s\) \(slurm\): ([\d_ ]+);", sweep.output)
    assert match, sweep.output
    ids = match.group(1).split()
    print(f"sbatch job ids: {' '.join(ids)}", flush=True)
    record_property(SHOWN, f"sbatch job ids {' '.join(ids)}")
    return ids


def squeue(ids: list[str]) -> list[str]:
    out = subprocess.run(
        ["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True, check=True
    )
    return [i for i in out.stdout.split() if i in ids]


def next_running_job(sweep: Sweep, name: str, ids: list[str]) -> str:
    """The job id of a worker that runs a trial now."""
    assert PG_URL is not None
    end = time.time() + 60
    while time.time() < end and sweep.proc.poll() is None:
        with contextlib.suppress(Exception):  # busy
            running = load(PG_URL, name).get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            workers = [int(t.user_attrs["worker"]) for t in running if "worker" in t.user_attrs]
            if workers:
                return ids[workers[0]]
        time.sleep(0.2)
    raise AssertionError(f"no running trial within 60 s:\n{sweep.output}")


def test_a_job_array_shares_one_study_and_a_cancelled_job_is_retried(
    tmp_path: Path, study_name: str, record_property: Callable[[str, object], None]
) -> None:
    assert PG_URL is not None
    n, jobs = 24, 3
    sweep = Sweep(slurm_args(study_name, n, jobs, "launcher.timeout_min=10"), tmp_path)
    wait_until(lambda: "submitted" in sweep.output, 120, "sbatch", sweep)
    ids = job_ids(sweep, record_property)
    wait_until(finished_at_least(PG_URL, study_name, 3), 180, "3 finished trials", sweep)
    victim = next_running_job(sweep, study_name, ids)
    subprocess.run(["scancel", victim], check=True)  # SIGTERM, SIGKILL after KillWait
    assert sweep.wait(600) == 0, sweep.output
    no_traceback(sweep)
    study = load(PG_URL, study_name)
    assert_consistent(study, n)
    assert states(study)["FAIL"] >= 1
    folder = tmp_path / "sweeps" / study_name / "submitit"
    for job in ids:  # each job's log under the study's folder
        assert (folder / f"{job}_0_log.err").is_file(), sorted(p.name for p in folder.iterdir())
    assert "CANCELLED" in (folder / f"{victim}_0_log.err").read_text()
    assert squeue(ids) == []
    record("slurm_scancel_one", study, jobs=jobs, cancelled=victim)


def test_jobs_stopped_at_their_time_limit_fail_their_trials_and_the_sweep_resumes(
    tmp_path: Path, study_name: str, record_property: Callable[[str, object], None]
) -> None:
    """--time=1 (minute) and 15 s trials: SLURM's SIGTERM, then SIGKILL, ends every job
    mid-trial; submitit's early USR2 (asked 90 s before the limit, so at once) must not end
    them sooner. A second run with a longer limit (and quicker trials) adds the rest."""
    assert PG_URL is not None
    n, jobs = 16, 2
    first = run(slurm_args(study_name, n, jobs, "launcher.timeout_min=1", sleep=5.0), tmp_path)
    assert first.proc.returncode == 1, first.output
    assert "run the same command again" in first.output
    ids = job_ids(first, record_property)
    study = load(PG_URL, study_name)
    counts = states(study)
    assert counts["RUNNING"] == 0 and 0 < counts["COMPLETE"] < n, counts
    assert counts["FAIL"] >= 1 and not unexplained_failures(study), counts
    folder = tmp_path / "sweeps" / study_name / "submitit"
    logs = [(folder / f"{job}_0_log.err").read_text() for job in ids]
    assert all("DUE TO TIME LIMIT" in log for log in logs), logs
    assert all("time limit is near; the running trial goes on" in log for log in logs), logs
    record("slurm_time_limit_first_run", study, jobs=jobs)

    again = run(slurm_args(study_name, n, jobs, "launcher.timeout_min=10", sleep=0.1), tmp_path)
    assert again.proc.returncode == 0, again.output
    study = load(PG_URL, study_name)
    assert_consistent(study, n)
    assert squeue(ids + job_ids(again, record_property)) == []
    record("slurm_time_limit", study, jobs=jobs, runs=2)


def test_every_job_cancelled_stops_the_launcher_and_the_same_command_resumes(
    tmp_path: Path, study_name: str, record_property: Callable[[str, object], None]
) -> None:
    assert PG_URL is not None
    n, jobs = 20, 2
    args = slurm_args(study_name, n, jobs, "launcher.timeout_min=10")
    sweep = Sweep(args, tmp_path)
    wait_until(lambda: "submitted" in sweep.output, 120, "sbatch", sweep)
    ids = job_ids(sweep, record_property)
    wait_until(finished_at_least(PG_URL, study_name, 3), 180, "3 finished trials", sweep)
    subprocess.run(["scancel", "--name", f"kmnist-{study_name}"], check=True)
    assert sweep.wait(300) == 1, sweep.output
    assert "run the same command again" in sweep.output
    no_traceback(sweep)
    study = load(PG_URL, study_name)
    assert states(study)["RUNNING"] == 0, states(study)
    again = run(args, tmp_path)
    assert again.proc.returncode == 0, again.output
    study = load(PG_URL, study_name)
    assert_consistent(study, n)
    time.sleep(1)
    assert squeue(ids + job_ids(again, record_property)) == []
    record("slurm_cancel_all_resume", study, jobs=jobs)
