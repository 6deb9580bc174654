"""`launcher=slurm`: the job parameters it hands to submitit, and sweeps whose workers are
submitit jobs, run here through submitit's LocalExecutor (the same job code, as processes).

The PostgreSQL test needs KMNIST_SWEEP_PG_URL (e.g. postgresql://postgres@127.0.0.1:5432/test).
"""

from __future__ import annotations

import collections
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import submitit
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from kmnist_sweep.errors import ConfigError, SweepStopped
from kmnist_sweep.results.outputs import hydra_base_overrides
from kmnist_sweep.sweep import slurm as launcher
from kmnist_sweep.sweep.runner import run_sweep
from tests.sweep import test_runner
from tests.sweep.test_runner import PG_URL, REPO, load

LAUNCHERS = sorted(p.stem for p in (REPO / "conf" / "launcher").glob("*.yaml"))
toy_cfg = test_runner.toy_cfg  # the fixture: a toy-objective config, its PG study deleted after
LOCAL_JOBS = ("launcher=slurm", "debug.executor=local")  # submitit's LocalExecutor


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_configs_compose_and_comment_every_key(compose_cfg: Any, name: str) -> None:
    cfg = compose_cfg(f"launcher={name}", "+sweep=lr").launcher
    assert cfg.name == name
    resolved = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert isinstance(resolved, dict)
    lines = (REPO / "conf" / "launcher" / f"{name}.yaml").read_text().splitlines()
    keys = [line for line in lines if line and line[0] not in "# "]
    assert len(keys) == len(cfg)
    assert all(" # " in line for line in keys), "each key needs a trailing comment"


def test_local_is_the_default(compose_cfg: Any) -> None:
    assert compose_cfg().launcher.name == "local"


def test_slurm_parameters_reach_the_sbatch_script(
    compose_cfg: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = compose_cfg(
        "+sweep=batchsize",
        "launcher=slurm",
        "launcher.jobs=8",
        "launcher.partition=gpu",
        "launcher.timeout_min=90",
        "launcher.mem_gb=16",
        "+launcher.additional_parameters.mail_type=END",
    ).launcher
    params = launcher.slurm_parameters(cfg)
    assert params == {
        "name": "kmnist-batchsize-kmnist",
        "nodes": 1,
        "tasks_per_node": 1,
        "gpus_per_node": 1,
        "timeout_min": 90,
        "cpus_per_task": 8,
        "mem_gb": 16.0,
        "slurm_partition": "gpu",
        "slurm_additional_parameters": {"mail_type": "END"},
    }
    # submitit's own checks and its sbatch text, as on a cluster (srun pretended present).
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))
    executor = submitit.AutoExecutor(folder=tmp_path, cluster="slurm")
    executor.update_parameters(**params)
    sbatch = executor._executor._make_submission_file_text("python -m x", "uid")
    for line in (
        "--gpus-per-node=1",
        "--partition=gpu",
        "--time=90",
        "--mem=16GB",
        "--cpus-per-task=8",
        "--mail-type=END",
        "--job-name=kmnist-batchsize-kmnist",
    ):
        assert f"#SBATCH {line}\n" in sbatch, line


@pytest.mark.parametrize(
    "override, message",
    [
        ("debug.executor=pbs", "debug.executor='pbs' is not one of slurm, local"),
        ("launcher.jobs=0", "launcher.jobs=0 is not a whole number >= 1"),
        ("launcher.jobs=many", "launcher.jobs='many' is not a whole number >= 1"),
        ("launcher.gpus_per_job=-1", "launcher.gpus_per_job=-1 is not a whole number >= 0"),
    ],
)
def test_bad_launcher_config_is_one_line(compose_cfg: Any, override: str, message: str) -> None:
    cfg = compose_cfg("+sweep=lr", *LOCAL_JOBS, override)
    with pytest.raises(ConfigError) as info:
        run_sweep(cfg)  # before any study is created or job submitted
    assert str(info.value) == message


@pytest.mark.skipif(shutil.which("srun") is not None, reason="this machine has SLURM")
def test_slurm_executor_without_slurm_is_one_line(compose_cfg: Any) -> None:
    with pytest.raises(ConfigError, match="no SLURM here .srun not found.; .*executor=local"):
        launcher.check(compose_cfg("launcher=slurm"))


def test_without_submitit_is_one_line(compose_cfg: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "submitit", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"^launcher=slurm needs submitit: pip install"):
        launcher.check(compose_cfg(*LOCAL_JOBS))


def test_best_yaml_leaves_the_launcher_and_debug_switches_out() -> None:
    """The retrain command in best.yaml needs no launcher: it trains once, without the test
    switches of the debug group."""
    user = ["+sweep=batchsize", "data=synthetic", "launcher=slurm", "launcher.jobs=8"]
    user += [*LOCAL_JOBS[1:], "debug.inject_oom={above: 64}"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        HydraConfig.instance().set_config(compose("config", user, return_hydra_config=True))
        try:
            base = hydra_base_overrides(compose("config", overrides=user))
        finally:
            HydraConfig.instance().cfg = None  # type: ignore[assignment]
    assert base == ["data=synthetic", "trainer.epochs=3", "batch_size.min_steps=100"]


# --------------------------------------------------------------------------- jobs


def _worker_trials(cfg: DictConfig) -> tuple[collections.Counter[str], collections.Counter[str]]:
    """(trials per state, finished trials per worker index)."""
    trials = load(cfg).get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    return (
        collections.Counter(t.state.name for t in trials),
        collections.Counter(str(t.user_attrs.get("worker")) for t in finished),
    )


def _job_logs(cfg: DictConfig) -> list[Path]:
    return sorted(Path(str(cfg.launcher.folder)).glob("*_0_log.err"))


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.skipif(not PG_URL, reason="KMNIST_SWEEP_PG_URL is not set")
def test_four_local_jobs_on_postgres_lose_no_trial(toy_cfg: Any) -> None:
    cfg = toy_cfg(
        "+sweep=lr",
        "study.n_trials=24",
        *LOCAL_JOBS,
        "launcher.jobs=4",  # gpus_per_job stays 1: on a CPU machine that must not matter
        toy={"epochs": 3, "sleep": 0.05, "start_together": 4},  # trials 0-3 wait for 4 jobs
        storage="postgres",  # a fresh uuid study name, deleted afterwards
    )
    start = time.perf_counter()
    summary = run_sweep(cfg)
    seconds = time.perf_counter() - start
    states, per_worker = _worker_trials(cfg)
    assert summary.complete + summary.pruned == 24 == states["COMPLETE"] + states["PRUNED"]
    assert states["FAIL"] == 0 and states["RUNNING"] == 0 and states["WAITING"] == 0
    assert sorted(per_worker) == ["0", "1", "2", "3"], per_worker  # each job ran trials
    logs = _job_logs(cfg)
    assert len(logs) == 4  # four distinct jobs
    for log in logs:
        text = log.read_text()
        assert "Traceback" not in text and "joins study" in text, log
    print(f"4 jobs, 24 trials, {dict(per_worker)} per worker, 0 lost, {seconds:.1f} s")


@pytest.mark.slow
def test_a_failed_job_is_reported_with_its_log(
    toy_cfg: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Also a job on SQLite: trial 0 completes before trial 1 stops the worker."""
    cfg = toy_cfg(
        "+sweep=lr", "study.n_trials=3", *LOCAL_JOBS, "launcher.jobs=1", toy={"interrupt_trial": 1}
    )
    stopped = pytest.raises(SweepStopped, match="stopped at 1/3 finished trials .worker 0 exited")
    with caplog.at_level(logging.ERROR, logger="kmnist_sweep.sweep.slurm"), stopped:
        run_sweep(cfg)  # trial 1 raises KeyboardInterrupt inside the job
    (line,) = [r.getMessage() for r in caplog.records]
    assert "worker job 0" in line and "exited with status 130" in line
    assert line.endswith("_0_log.err") and Path(line.rsplit(" ", 1)[1]).exists()
