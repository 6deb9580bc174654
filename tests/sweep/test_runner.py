"""The sweep runner on a toy objective: totals, pruning, worker processes, storages, outputs.

Worker tests start real processes on one storage. Set KMNIST_SWEEP_PG_URL (e.g.
postgresql://postgres@127.0.0.1:5432/test) to run them against PostgreSQL as well.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigAttributeError
from optuna.trial import TrialState

from kmnist_sweep import trial_attrs
from kmnist_sweep.config.search_space import apply_params, parse_space
from kmnist_sweep.errors import ConfigError
from kmnist_sweep.masking import mask_url
from kmnist_sweep.results.outputs import hydra_base_overrides
from kmnist_sweep.sweep.local import worker_devices
from kmnist_sweep.sweep.runner import run_sweep
from kmnist_sweep.sweep.storage import open_storage
from kmnist_sweep.sweep.study import build_pruner, build_sampler

REPO = Path(__file__).resolve().parents[2]
TOY = "tests.toy_objective:make_toy_objective"
PG_URL = os.environ.get("KMNIST_SWEEP_PG_URL")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)

STORAGES = [
    "sqlite",
    pytest.param(
        "postgres",
        marks=[
            pytest.mark.postgres,
            pytest.mark.skipif(not PG_URL, reason="KMNIST_SWEEP_PG_URL is not set"),
        ],
    ),
]


@pytest.fixture
def toy_cfg(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., DictConfig]]:
    """toy_cfg("study.n_trials=5", toy={"epochs": 3}, storage="postgres") -> a composed config
    whose study runs the toy objective, with storage/ and sweeps/ under tmp_path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO))  # `tests.toy_objective` importable under plain pytest
    made: list[tuple[str, str]] = []

    def _make(
        *overrides: str, toy: dict[str, Any] | None = None, storage: str = "sqlite"
    ) -> DictConfig:
        base = [
            "data=synthetic",
            f"debug.objective={TOY}",
            "study.sampler.type=random",
            "study.heartbeat_interval=1",
            "study.grace_period=2",
            "study.poll_interval=0.2",
        ]
        if storage == "postgres":
            base += [f"study.storage='{PG_URL}'", f"study.name=test-{uuid.uuid4().hex[:12]}"]
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=base + list(overrides))
        with open_dict(cfg):
            cfg.toy = {"epochs": 3, "sleep": 0.0, **(toy or {})}
        if storage == "postgres":
            made.append((str(cfg.study.name), str(cfg.study.storage)))
        return cfg

    yield _make
    for name, url in made:  # leave the shared database as we found it
        with contextlib.suppress(KeyError):
            optuna.delete_study(study_name=name, storage=open_storage(url))


def load(cfg: DictConfig) -> optuna.Study:
    storage = open_storage(str(cfg.study.storage))
    return optuna.load_study(study_name=str(cfg.study.name), storage=storage)


def states(study: optuna.Study) -> collections.Counter[str]:
    return collections.Counter(t.state.name for t in study.get_trials(deepcopy=False))


def finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


# --------------------------------------------------------------------------- one process


def test_a_stopped_study_completes_its_total_when_run_again(toy_cfg: Any) -> None:
    cfg = toy_cfg("+sweep=lr", "study.n_trials=6", toy={"interrupt_trial": 3})
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfg)  # Ctrl-C during trial 3
    study = load(cfg)
    assert finished(study) == 3 and states(study)["FAIL"] == 1  # trial 3 recorded as failed
    assert (Path(cfg.study.output_dir) / "trials.csv").exists()  # written on the way out

    again = toy_cfg("+sweep=lr", "study.n_trials=6")
    summary = run_sweep(again)
    assert finished(load(cfg)) == 6
    assert summary.complete + summary.pruned == 6 and summary.failed == 1

    summary = run_sweep(again)  # nothing left to do
    assert finished(load(cfg)) == 6 and summary.complete + summary.pruned == 6


def test_median_pruner_stores_every_epoch_and_prunes(toy_cfg: Any) -> None:
    cfg = toy_cfg(
        "+sweep=full",
        "study.n_trials=16",
        "study.pruner.type=median",
        "study.pruner.n_startup_trials=3",
        "study.pruner.n_warmup_steps=2",
        toy={"epochs": 5},
    )
    summary = run_sweep(cfg)
    trials = load(cfg).get_trials(deepcopy=False)
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert summary.pruned == len(pruned) >= 1 and len(complete) + len(pruned) == 16
    assert all(sorted(t.intermediate_values) == [1, 2, 3, 4, 5] for t in complete)
    assert all(2 <= len(t.intermediate_values) < 5 for t in pruned)  # pruned from epoch 2 on


def test_outputs_config_trials_and_best(toy_cfg: Any) -> None:
    cfg = toy_cfg("+sweep=full", "study.n_trials=5", toy={"epochs": 2})
    with open_dict(cfg):
        cfg.toy.api_key = "hunter2"  # a secret-looking key never reaches config.yaml
    summary = run_sweep(cfg)
    out = Path(cfg.study.output_dir)
    assert out == Path("sweeps") / "full-synthetic" and summary.output_dir == out
    assert "hunter2" not in (out / "config.yaml").read_text()
    assert OmegaConf.load(out / "config.yaml").study.name == "full-synthetic"

    rows = (out / "trials.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert header[:3] == ["number", "state", "value"] and "trainer.batch_size" in header
    assert len(rows) == 1 + 5

    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["value"] == pytest.approx(summary.best_value)
    assert best["trial"] == summary.best_trial and best["params"] == summary.best_params
    assert f"trainer.batch_size={summary.best_params['trainer.batch_size']}" in best["overrides"]
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files


def test_best_yaml_overrides_rebuild_the_best_config(toy_cfg: Any) -> None:
    """best.yaml's overrides, given to python -m kmnist_sweep, compose the best trial's config."""
    user = ["+sweep=batchsize", "data=synthetic", "trainer.lr=0.01", f"debug.objective={TOY}"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        full = compose("config", overrides=user, return_hydra_config=True)
        HydraConfig.instance().set_config(full)
        try:
            cfg = compose("config", overrides=user)
            base = hydra_base_overrides(cfg)
        finally:
            HydraConfig.instance().cfg = None  # type: ignore[assignment]
        assert base == [
            "data=synthetic",
            "trainer.lr=0.01",
            "trainer.epochs=3",
            "batch_size.min_steps=100",
        ]

        with open_dict(cfg):
            cfg.toy = {"epochs": 2, "sleep": 0.0}
        summary = run_sweep(cfg, base_overrides=base)
        best = yaml.safe_load((Path(cfg.study.output_dir) / "best.yaml").read_text())
        retrain = compose("config", overrides=best["overrides"])
    expected = apply_params(cfg, summary.best_params)
    for section in ("data", "model", "trainer", "lr_finder", "batch_size"):
        assert retrain[section] == expected[section], section
    assert not retrain.search_space


def test_grid_sampler_tries_each_batch_size_once(toy_cfg: Any) -> None:
    cfg = toy_cfg("+sweep=batchsize", "study.sampler.type=grid", toy={"epochs": 1})
    summary = run_sweep(cfg)
    sizes = sorted(t.params["trainer.batch_size.log2"] for t in load(cfg).trials)
    assert sizes == list(range(5, 12)) and summary.complete + summary.pruned == 7


def test_a_new_study_starts_from_the_config_once(toy_cfg: Any) -> None:
    """+sweep=full_cpu queues the defaults as trial 0; running it again adds no second copy."""
    cfg = toy_cfg("+sweep=full_cpu", "study.n_trials=2", toy={"epochs": 1})
    run_sweep(cfg)
    trials = load(cfg).get_trials(deepcopy=False)
    queued = [t.number for t in trials if trial_attrs.QUEUED in t.user_attrs]
    assert queued == [0]
    expected = {p.name: OmegaConf.select(cfg, p.name) for p in parse_space(cfg.search_space)}
    expected["trainer.batch_size.log2"] = expected.pop("trainer.batch_size").bit_length() - 1
    assert trials[0].params == expected  # the defaults, not a sample
    assert trials[1].params != expected

    run_sweep(toy_cfg("+sweep=full_cpu", "study.n_trials=4", toy={"epochs": 1}))
    trials = load(cfg).get_trials(deepcopy=False)
    assert len(trials) == 4 and [t for t in trials if t.params == expected] == trials[:1]


def test_a_config_value_outside_the_space_is_sampled_for_trial_0(
    toy_cfg: Any, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = toy_cfg("+sweep=full_cpu", "study.n_trials=1", "trainer.lr=0.9", toy={"epochs": 1})
    with caplog.at_level("INFO", logger="kmnist_sweep.sweep.runner"):
        run_sweep(cfg)
    (trial,) = load(cfg).get_trials(deepcopy=False)
    assert trial_attrs.QUEUED in trial.user_attrs and trial.params["trainer.epochs"] == 10
    assert 0.02 <= trial.params["trainer.lr"] <= 0.4  # sampled inside the space, not 0.9
    assert "trial 0 runs the config's own values: trainer.batch_size=64 " in caplog.text
    assert "the config's trainer.lr lie outside search_space" in caplog.text


def test_a_sweep_without_start_from_defaults_samples_its_first_trial(toy_cfg: Any) -> None:
    cfg = toy_cfg("+sweep=full_cpu", "study.n_trials=1", "study.start_from_defaults=false")
    run_sweep(cfg)
    (trial,) = load(cfg).get_trials(deepcopy=False)
    assert trial_attrs.QUEUED not in trial.user_attrs
    assert trial.params["trainer.lr"] != cfg.trainer.lr


def test_timeout_stops_starting_trials(toy_cfg: Any) -> None:
    summary = run_sweep(toy_cfg("+sweep=lr", "study.n_trials=50", "study.timeout=0"))
    assert summary.complete + summary.pruned == 0  # no error: the user asked for the limit


def test_journal_storage(toy_cfg: Any, tmp_path: Path) -> None:
    cfg = toy_cfg("+sweep=lr", "study.n_trials=3", "study.storage=journal:///storage/lr.log")
    summary = run_sweep(cfg)
    assert summary.complete + summary.pruned == 3
    assert (tmp_path / "storage" / "lr.log").stat().st_size > 0


def test_an_existing_study_with_another_direction_is_a_clash(toy_cfg: Any) -> None:
    cfg = toy_cfg("+sweep=lr", "study.n_trials=2")
    run_sweep(cfg)
    flipped = toy_cfg("+sweep=lr", "study.n_trials=2", "study.direction=minimize")
    with pytest.raises(ConfigError, match="already exists .* with direction maximize"):
        run_sweep(flipped)


# --------------------------------------------------------------------------- storage URLs


def test_mask_url_hides_passwords() -> None:
    assert mask_url("postgresql://bob:s3cret@db:5432/x") == "postgresql://bob:***@db:5432/x"
    assert (
        mask_url("postgresql://db/x?password=s3cret&a=1") == "postgresql://db/x?password=***&a=1"
    )
    assert mask_url("sqlite:///storage/a.db") == "sqlite:///storage/a.db"
    assert mask_url("host=db user=bob password=s3cret") == "host=db user=bob password=***"


@pytest.mark.parametrize(
    "url, message",
    [
        ("not a url", "is not a storage URL"),
        ("nosuchdb://x/y", "cannot open study.storage='nosuchdb://x/y'"),
        ("postgresql://bob:s3cret@127.0.0.1:1/x", "cannot open study.storage="),
    ],
)
def test_bad_storage_url_is_one_masked_line(url: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        open_storage(url)
    text = str(info.value)
    assert message in text and "\n" not in text and "s3cret" not in text


def test_sqlite_storage_uses_wal_and_creates_its_folder(tmp_path: Path) -> None:
    import sqlite3

    open_storage(f"sqlite:///{tmp_path}/a/b/study.db")
    con = sqlite3.connect(tmp_path / "a" / "b" / "study.db")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()


def test_samplers_and_pruners_are_built_from_config(
    compose_cfg: Callable[..., DictConfig],
) -> None:
    def study(*overrides: str) -> DictConfig:
        return compose_cfg(*overrides).study

    space = parse_space({"model.arch": {"type": "categorical", "choices": ["a", "b"]}})
    grid = study("study.sampler.type=grid").sampler
    assert isinstance(build_sampler(grid, space), optuna.samplers.GridSampler)
    assert isinstance(build_sampler(study().sampler), optuna.samplers.TPESampler)
    gp = build_sampler(study("study.sampler.type=gp").sampler)
    assert isinstance(gp, optuna.samplers.GPSampler)
    with pytest.raises(ConfigError, match="grid cannot enumerate search_space.trainer.lr"):
        build_sampler(grid, parse_space({"trainer.lr": {"type": "float", "low": 0.1, "high": 1}}))
    hyperband = build_pruner(study("study.pruner.type=hyperband", "trainer.epochs=9").pruner)
    assert isinstance(hyperband, optuna.pruners.HyperbandPruner) and hyperband._max_resource == 9
    none = build_pruner(study("study.pruner.type=none").pruner)
    assert isinstance(none, optuna.pruners.NopPruner)


def test_the_sampler_and_pruner_take_their_settings_from_conf(
    compose_cfg: Callable[..., DictConfig],
) -> None:
    """conf/study/default.yaml alone sets them: the code has no defaults of its own."""
    cfg = compose_cfg().study
    tpe = build_sampler(cfg.sampler)
    assert isinstance(tpe, optuna.samplers.TPESampler)
    assert tpe._n_startup_trials == cfg.sampler.n_startup_trials
    median = build_pruner(cfg.pruner)
    assert isinstance(median, optuna.pruners.MedianPruner)
    jury, conf = median, cfg.pruner
    assert (jury._n_startup_trials, jury._n_warmup_steps, jury._n_min_trials) == (
        conf.n_startup_trials,
        conf.n_warmup_steps,
        conf.n_min_trials,
    )
    with pytest.raises(ConfigAttributeError):
        build_pruner(OmegaConf.create({"type": "median"}))  # no silent fallback values


def test_worker_count_and_gpu_round_robin(toy_cfg: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from kmnist_sweep.config.check import check_config
    from kmnist_sweep.sweep import local

    cfg = toy_cfg("study.workers=3")
    monkeypatch.setattr(local, "visible_gpus", lambda device="auto": [])
    assert worker_devices(cfg) == [None, None, None]
    monkeypatch.setattr(local, "visible_gpus", lambda device="auto": ["2", "5"])
    cfg = toy_cfg("study.workers=auto", "study.workers_per_gpu=2")
    assert worker_devices(cfg) == ["2", "5", "2", "5"]
    with pytest.raises(ConfigError, match="study.workers"):
        check_config(toy_cfg("+sweep=lr", "study.workers=many"))


# --------------------------------------------------------------------------- worker processes


@pytest.mark.slow
@pytest.mark.parametrize("storage", STORAGES)
def test_four_workers_lose_no_trial(toy_cfg: Any, storage: str) -> None:
    cfg = toy_cfg(
        "+sweep=lr",
        "study.n_trials=100",
        "study.workers=4",
        toy={"epochs": 2, "sleep": 0.01},
        storage=storage,
    )
    summary = run_sweep(cfg)
    study = load(cfg)
    trials = study.get_trials(deepcopy=False)
    assert finished(study) == 100 == summary.complete + summary.pruned
    # The only failures allowed: a trial that two workers raced for and that stood down.
    assert all(t.user_attrs.get("surplus") for t in trials if t.state == TrialState.FAIL)
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    logs = sorted(Path(cfg.study.output_dir, "logs").glob("worker-*.log"))
    assert len(logs) == 4
    for log in logs:
        text = log.read_text()
        assert "database is locked" not in text and "Traceback" not in text, log


@pytest.mark.slow
@pytest.mark.parametrize("storage", STORAGES)
def test_a_killed_workers_trial_is_retried(toy_cfg: Any, storage: str) -> None:
    cfg = toy_cfg(
        "+sweep=lr",
        "study.n_trials=12",
        "study.workers=3",
        toy={"epochs": 3, "sleep": 0.05, "kill_trial": 2},
        storage=storage,
    )
    summary = run_sweep(cfg)  # worker running trial 2 SIGKILLs itself after epoch 1
    study = load(cfg)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    assert trials[2].state == TrialState.FAIL
    retries = [t for t in trials.values() if t.system_attrs.get("failed_trial") == 2]
    assert len(retries) == 1 and retries[0].state in FINISHED
    assert retries[0].params == trials[2].params
    assert finished(study) == 12 == summary.complete + summary.pruned


# --------------------------------------------------------------------------- dashboard


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


@pytest.mark.slow
def test_optuna_dashboard_serves_the_study(toy_cfg: Any, tmp_path: Path) -> None:
    cfg = toy_cfg("+sweep=lr", "study.n_trials=3")
    run_sweep(cfg)
    url = f"sqlite:///{tmp_path / 'storage' / 'lr-synthetic.db'}"
    port = _free_port()
    exe = shutil.which("optuna-dashboard")
    if exe is None:
        pytest.skip("optuna-dashboard is not on PATH")
    log_path = tmp_path / "dashboard.log"
    with open(log_path, "wb") as log:
        dashboard = subprocess.Popen(
            [exe, url, "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=log
        )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                studies = _get(f"{base}/api/studies")["study_summaries"]
                break
            except OSError:
                assert dashboard.poll() is None, log_path.read_text()
                assert time.time() < deadline, "optuna-dashboard did not answer within 60 s"
                time.sleep(0.3)
        (study,) = [s for s in studies if s["study_name"] == "lr-synthetic"]
        detail = _get(f"{base}/api/studies/{study['study_id']}?after=0")
        assert len(detail["trials"]) == 3
        assert {t["state"] for t in detail["trials"]} <= {"Complete", "Pruned"}
        assert {a["key"] for a in detail["user_attrs"]} >= {"metric", "search_space"}
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=10)
