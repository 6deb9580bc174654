"""Run a study: open its storage, create or load it, start workers, write sweeps/<study>/.

    summary = run_sweep(cfg)          # cfg composed with +sweep=NAME

`study.n_trials` is the study's total of finished (complete + pruned) trials: a second run
of the same study only adds what is missing. `study.workers` processes share the study
through its storage; a trial whose worker died is failed after `grace_period` seconds
without a heartbeat and queued again (SQLite, PostgreSQL and MySQL storages).
"""

from __future__ import annotations

import csv
import datetime
import importlib
import importlib.util
import io
import json
import logging
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import optuna
import sqlalchemy
from omegaconf import DictConfig, OmegaConf
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from kmnist_sweep import batch_size, lr_finder, report
from kmnist_sweep.checks import check_choice, check_number, check_writable_dir
from kmnist_sweep.errors import ConfigError, Interrupted, SweepStopped
from kmnist_sweep.search_space import (
    Param,
    format_override_value,
    optuna_name,
    parse_space,
    pow2_exponents,
    space_difference,
    to_overrides,
)
from kmnist_sweep.tracking import scrub, scrub_text

log = logging.getLogger(__name__)

Objective = Callable[[optuna.Trial], float]
ObjectiveFactory = Callable[[DictConfig], Objective]

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # what counts towards study.n_trials
SQLITE_BUSY_TIMEOUT_S = 60.0  # seconds a SQLite writer waits for the lock before failing
OPEN_ATTEMPTS = 5  # tries to open a storage that answers "database is locked"
STOP_WAIT_S = 10.0  # seconds workers get to record their trial after Ctrl-C
STORAGE_PATIENCE_S = 600.0  # seconds a worker retries a storage that does not answer
# What a storage that went away raises: lost connections, refused ones, failed commits.
STORAGE_ERRORS: tuple[type[Exception], ...] = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    optuna.exceptions.StorageInternalError,
)
SLOT_LOCK = ".slots.lock"  # file under output_dir that workers on one host take turns on
DEFAULT_OBJECTIVE = "kmnist_sweep.objective:make_objective"  # the real trainer, with a report
WORKER_ENTRY = "from kmnist_sweep.runner import worker_main; worker_main()"


@dataclass(frozen=True)
class SweepSummary:
    """What a run left in the study."""

    study_name: str
    storage: str  # URL with any password masked
    n_trials: int  # the study's target total of finished trials
    complete: int
    pruned: int
    failed: int
    best_value: float | None
    best_trial: int | None  # trial number
    best_params: dict[str, Any] = field(default_factory=dict)  # dotted config key -> value
    output_dir: Path = Path(".")


# --------------------------------------------------------------------------- storage


def mask_url(url: str) -> str:
    """The URL with its password (and any `password=` query value) replaced by ***."""
    return scrub_text(url)


def open_storage(
    url: str,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    max_retry: int | None = 2,
) -> BaseStorage:
    """Open (creating if needed) the storage named by `url`.

    `sqlite:///relative.db` / `sqlite:////abs.db`: parent folder created, WAL journal, a 60 s
    busy timeout. Any other SQLAlchemy URL (postgresql://user@host/db) goes to RDBStorage
    as is. `journal:///relative.log` / `journal:////abs.log`: Optuna's JournalFileBackend
    (no heartbeat, so a killed worker's trial is not retried). With `heartbeat_interval`,
    a running trial silent for `grace_period` seconds is failed and queued again, at most
    `max_retry` times (None: no limit).
    """
    if url.startswith("journal:"):
        return _open_journal(url)
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise ConfigError(
            f"study.storage={mask_url(url)!r} is not a storage URL "
            "(sqlite:///file.db, postgresql://user@host/db or journal:///file.log)"
        ) from None
    driver_url = _with_installed_driver(url, parsed)  # messages show the user's url
    engine_kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database not in ("", ":memory:") and not database.startswith("file:"):
            _prepare_sqlite_file(url, Path(database))
        engine_kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
    else:
        engine_kwargs["pool_pre_ping"] = True
    heartbeat: dict[str, Any] = {}
    if heartbeat_interval is not None:
        heartbeat = {
            "heartbeat_interval": int(heartbeat_interval),
            "grace_period": None if grace_period is None else int(grace_period),
            **_retry_callback(max_retry),
        }
    for attempt in range(OPEN_ATTEMPTS):
        try:
            with _quiet_optuna_warnings():
                return optuna.storages.RDBStorage(
                    driver_url, engine_kwargs=engine_kwargs, **heartbeat
                )
        except Exception as exc:  # driver, network and schema errors all mean "cannot open"
            if _is_lock_error(exc) and attempt + 1 < OPEN_ATTEMPTS:
                time.sleep(0.2 * 2**attempt)
                continue
            if isinstance(exc, sqlalchemy.exc.NoSuchModuleError):
                raise ConfigError(
                    f"cannot open study.storage={mask_url(url)!r}: unknown database "
                    f"{parsed.drivername!r} (sqlite:///file.db, postgresql://user@host/db or "
                    "journal:///file.log)"
                ) from None
            raise ConfigError(
                f"cannot open study.storage={mask_url(url)!r}: {_one_line(exc, url)}"
            ) from None
    raise AssertionError("unreachable")


def _open_journal(url: str) -> BaseStorage:
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    path = url.removeprefix("journal:").removeprefix("//")
    path = path[1:] if path.startswith("/") else path  # journal:///rel, journal:////abs
    if not path:
        raise ConfigError(f"study.storage={url!r}: journal URLs look like journal:///file.log")
    if not Path(path).parent.is_dir():
        check_writable_dir(Path(path).parent, f"cannot create the folder of study.storage={url!r}")
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(path))
    except OSError as exc:
        raise ConfigError(f"cannot open study.storage={url!r}: {exc}") from None


def _prepare_sqlite_file(url: str, path: Path) -> None:
    """Create the folder and switch the file to WAL: readers no longer block the writer."""
    if not path.parent.is_dir():
        check_writable_dir(path.parent, f"cannot create the folder of study.storage={url!r}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the folder of study.storage={url!r}: {exc}") from None
    for attempt in range(OPEN_ATTEMPTS):
        try:
            con = sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_S)
            try:
                # Persistent: set once per file, kept by every later connection.
                con.execute("PRAGMA journal_mode=WAL")
            finally:
                con.close()
            return
        except sqlite3.DatabaseError as exc:  # locked, unreadable, or not a database
            if _is_lock_error(exc) and attempt + 1 < OPEN_ATTEMPTS:
                time.sleep(0.2 * 2**attempt)
                continue
            raise ConfigError(f"cannot open study.storage={url!r}: {exc}") from None


def _with_installed_driver(url: str, parsed: sqlalchemy.engine.URL) -> str:
    """postgresql:// means psycopg (3) to SQLAlchemy >= 2.1; fall back to psycopg2 if that is
    the driver installed (our `postgres` extra installs psycopg2-binary)."""
    if parsed.drivername != "postgresql":
        return url
    if importlib.util.find_spec("psycopg") or not importlib.util.find_spec("psycopg2"):
        return url
    return parsed.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)


def _retry_callback(max_retry: int | None) -> dict[str, Any]:
    retry = None if max_retry is None else int(max_retry)
    with _quiet_optuna_warnings():
        if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):  # Optuna >= 4.9
            callback = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=retry)
            return {"heartbeat_stale_trial_callback": callback}
        callback = optuna.storages.RetryFailedTrialCallback(max_retry=retry)
        return {"failed_trial_callback": callback}


def _is_lock_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "database is locked" in text or "database is busy" in text


def _one_line(exc: BaseException, url: str) -> str:
    """First line of an error, type-named, with the URL's password scrubbed."""
    if isinstance(exc, ImportError):
        return "its database driver is not installed (PostgreSQL: pip install psycopg2-binary)"
    cause = getattr(exc, "orig", None) or exc
    lines = str(cause).strip().splitlines() or [""]
    text = f"{type(cause).__name__}: {lines[0]}"
    password = _password(url)
    return text.replace(password, "***") if password else text


def _password(url: str) -> str | None:
    try:
        return sqlalchemy.engine.make_url(url).password  # type: ignore[return-value]
    except sqlalchemy.exc.ArgumentError:
        return None


@contextmanager
def _quiet_optuna_warnings() -> Iterator[None]:
    """Heartbeats and fail_stale_trials are 'experimental' in Optuna; say so once, in docs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


# --------------------------------------------------------------------------- study


def batch_constraint(trial: FrozenTrial) -> list[float]:
    """Feasibility for constraint-aware samplers: batch halvings the request needed."""
    return batch_size.constraint(trial.user_attrs)


def build_sampler(
    sampler_cfg: DictConfig, params: Sequence[Param] = (), seed_offset: int = 0
) -> optuna.samplers.BaseSampler:
    """The sampler named by `study.sampler.type`; worker i passes seed_offset=i."""
    kind = str(sampler_cfg.get("type", "tpe"))
    seed = sampler_cfg.get("seed")
    seed = None if seed is None else int(seed) + seed_offset
    n_startup = int(sampler_cfg.get("n_startup_trials", 10))
    with _quiet_optuna_warnings():
        if kind == "tpe":
            # constant_liar: parallel workers treat running trials as bad, so they spread out.
            return optuna.samplers.TPESampler(
                seed=seed,
                n_startup_trials=n_startup,
                constant_liar=True,
                constraints_func=batch_constraint,
            )
        if kind == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if kind == "grid":
            return optuna.samplers.GridSampler(grid_space(params), seed=seed)
        if kind == "cmaes":
            try:
                import cmaes  # noqa: F401
            except ImportError:
                raise ConfigError(
                    "study.sampler.type=cmaes needs the cmaes package (pip install cmaes)"
                ) from None
            return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=n_startup)
        if kind == "gp":
            return optuna.samplers.GPSampler(
                seed=seed, n_startup_trials=n_startup, constraints_func=batch_constraint
            )
    raise ConfigError(f"study.sampler.type={kind!r} is not one of tpe, random, grid, cmaes, gp")


def grid_space(params: Sequence[Param]) -> dict[str, list[Any]]:
    """Every value of each param, under the names the objective suggests them by."""
    grid: dict[str, list[Any]] = {}
    for p in params:
        name = optuna_name(p)
        if p.type == "categorical":
            grid[name] = list(p.choices)
        elif p.type == "pow2":
            lo, hi = pow2_exponents(p)
            grid[name] = list(range(lo, hi + 1))
        elif p.type == "int" and not p.log:
            grid[name] = list(range(int(p.low), int(p.high) + 1, int(p.step or 1)))
        elif p.type == "float" and p.step is not None and not p.log:
            count = int(round((p.high - p.low) / p.step)) + 1
            grid[name] = [round(p.low + i * p.step, 12) for i in range(count)]
        else:
            raise ConfigError(
                f"study.sampler.type=grid cannot enumerate search_space.{p.name} ({p.type}"
                f"{', log' if p.log else ''}): use int, pow2, categorical or float with step"
            )
    if not grid:
        raise ConfigError("study.sampler.type=grid needs a non-empty search_space")
    return grid


def build_pruner(pruner_cfg: DictConfig) -> optuna.pruners.BasePruner:
    """The pruner named by `study.pruner.type`; its resource is the epoch."""
    kind = str(pruner_cfg.get("type", "none"))
    if kind in ("none", "None", "null"):
        return optuna.pruners.NopPruner()
    if kind == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=int(pruner_cfg.get("n_startup_trials", 5)),
            n_warmup_steps=int(pruner_cfg.get("n_warmup_steps", 0)),
        )
    min_resource = int(pruner_cfg.get("min_resource", 1))
    reduction = int(pruner_cfg.get("reduction_factor", 3))
    if min_resource < 1 or reduction < 2:
        raise ConfigError(
            f"study.pruner: {kind} needs min_resource >= 1 and reduction_factor >= 2, "
            f"got {min_resource} and {reduction}"
        )
    if kind == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=min_resource, reduction_factor=reduction
        )
    if kind == "hyperband":
        max_resource = int(pruner_cfg.get("max_resource", 1))
        if max_resource < min_resource:
            raise ConfigError(
                f"study.pruner.max_resource={max_resource} (epochs) is below "
                f"min_resource={min_resource}"
            )
        return optuna.pruners.HyperbandPruner(
            min_resource=min_resource, max_resource=max_resource, reduction_factor=reduction
        )
    raise ConfigError(f"study.pruner.type={kind!r} is not one of none, median, halving, hyperband")


def create_or_load_study(
    study_cfg: DictConfig,
    storage: BaseStorage,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
    search_space: dict[str, Any] | None = None,
) -> optuna.Study:
    """The study named `study.name`, created on first use; a clashing existing one is an error.

    With `search_space` (the resolved mapping), an existing study must have been created
    with the same one (same keys, types, bounds and choices, however written), checked
    before anything is written; a new study, or an older one without it, stores it.
    """
    name = str(study_cfg.name)
    direction = str(study_cfg.direction)
    metric = str(study_cfg.metric)
    if direction not in ("maximize", "minimize"):
        raise ConfigError(f"study.direction={direction!r} is not maximize or minimize")
    try:
        study_id: int | None = storage.get_study_id_from_name(name)
    except KeyError:
        study_id = None
    if study_id is not None:
        directions = [d.name.lower() for d in storage.get_study_directions(study_id)]
        if directions != [direction]:
            raise ConfigError(
                f"study {name!r} already exists in {mask_url(str(study_cfg.storage))} with "
                f"direction {'/'.join(directions)}, not {direction}: pick another study.name"
            )
        attrs = storage.get_study_user_attrs(study_id)
        old_metric = attrs.get("metric")
        if old_metric is not None and old_metric != metric:
            raise ConfigError(
                f"study {name!r} already exists in {mask_url(str(study_cfg.storage))} with "
                f"metric {old_metric}, not {metric}: pick another study.name"
            )
        old_space = attrs.get("search_space")
        if search_space is not None and old_space is not None:
            difference = space_difference(old_space, search_space)
            if difference is not None:
                raise ConfigError(
                    f"study {name!r} already exists in {mask_url(str(study_cfg.storage))} "
                    f"with another search space ({difference}): pick another study.name"
                )
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        direction=cast(Any, direction),
        sampler=sampler,
        pruner=pruner,
        load_if_exists=True,
    )
    if study_id is None:
        study.set_user_attr("metric", metric)
    if search_space is not None and "search_space" not in study.user_attrs:
        study.set_user_attr("search_space", search_space)
    return study


# Study values check_study_config checks (when present): key -> check_number's arguments.
STUDY_NUMBERS: dict[str, dict[str, Any]] = {
    "n_trials": {"whole": True, "low": 1},
    "timeout": {"low": 0, "nullable": True},
    "poll_interval": {"low": 0, "low_open": True},
    "heartbeat_interval": {"whole": True, "low": 1, "nullable": True},
    "grace_period": {"whole": True, "low": 1, "nullable": True},
    "max_retry": {"whole": True, "low": 0, "nullable": True},
    "max_failed": {"whole": True, "low": 1, "nullable": True},
    "storage_patience": {"low": 0},
    "workers_per_gpu": {"whole": True, "low": 1},
    "sampler.seed": {"whole": True, "low": 0, "nullable": True},
    "sampler.n_startup_trials": {"whole": True, "low": 0},
    "pruner.n_startup_trials": {"whole": True, "low": 0},
    "pruner.n_warmup_steps": {"whole": True, "low": 0},
    "pruner.min_resource": {"whole": True},  # ranges: build_pruner, for the pruners using them
    "pruner.max_resource": {"whole": True},
    "pruner.reduction_factor": {"whole": True},
}
_ABSENT = object()


def check_study_config(study_cfg: DictConfig) -> int:
    """The study's own values (types, ranges, direction) as ConfigErrors, before anything is
    opened or created; study.n_trials."""
    check_choice("study.direction", study_cfg.get("direction"), ("maximize", "minimize"))
    for key, rule in STUDY_NUMBERS.items():
        value = OmegaConf.select(study_cfg, key, default=_ABSENT)
        if value is not _ABSENT:
            check_number(f"study.{key}", value, **rule)
    return check_number("study.n_trials", study_cfg.get("n_trials"), whole=True, low=1)


def copy_study(name: str, from_url: str, to_url: str) -> int:
    """Copy study `name` with its trials and attributes (LR-finder curves, search space) to
    another storage, e.g. SQLite -> PostgreSQL when a sweep outgrows one machine; the
    number of trials copied. The source is left as it is; an existing study of that name
    at the destination is an error, and so is a source with trials still running."""
    source = open_storage(from_url)
    try:
        study = optuna.load_study(study_name=name, storage=source)
    except KeyError:
        raise ConfigError(f"no study {name!r} in {mask_url(from_url)}") from None
    trials = study.get_trials(deepcopy=False)
    running = [t.number for t in trials if t.state == TrialState.RUNNING]
    if running:
        raise ConfigError(
            f"study {name!r} has running trials {running}: stop its sweep first (Ctrl-C), "
            "or wait for it to end"
        )
    target = open_storage(to_url)
    try:
        target.get_study_id_from_name(name)
    except KeyError:
        pass
    else:
        raise ConfigError(f"study {name!r} already exists in {mask_url(to_url)}")
    with _quiet_optuna_warnings():
        optuna.copy_study(from_study_name=name, from_storage=source, to_storage=target)
    copied = optuna.load_study(study_name=name, storage=target).get_trials(deepcopy=False)
    if len(copied) != len(trials):  # never leave a half copy that looks like the study
        optuna.delete_study(study_name=name, storage=target)
        raise SweepStopped(f"copy of {name!r} held {len(copied)} of {len(trials)} trials")
    return len(copied)


def load_objective_factory(path: str) -> ObjectiveFactory:
    """`package.module:function` -> the function (study.objective in the config)."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"study.objective={path!r} must look like package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"study.objective={path!r}: cannot import {module_name}: {exc}"
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"study.objective={path!r}: {module_name} has no function {attr}")
    return cast(ObjectiveFactory, factory)


# --------------------------------------------------------------------------- the sweep


def run_sweep(
    cfg: DictConfig,
    objective_factory: ObjectiveFactory | None = None,
    base_overrides: Sequence[str] | None = None,
) -> SweepSummary:
    """Run the study in `cfg.study` over `cfg.search_space` until it holds n_trials trials.

    `objective_factory(cfg)` builds the objective once per worker; by default the one named
    by `study.objective`. `base_overrides` are the command-line overrides best.yaml repeats
    (default: taken from Hydra's runtime config when there is one).
    """
    study_cfg = cfg.study
    params = parse_space(cfg.search_space, cfg)
    if not params:
        raise ConfigError("search_space is empty: pick a sweep, e.g. +sweep=batchsize")
    n_trials = check_study_config(study_cfg)
    jobs = _cluster_jobs(cfg)  # launcher=slurm: worker jobs to submit; None: workers here
    devices: list[str | None] = worker_devices(cfg) if jobs is None else [None] * jobs
    objective_path = _objective_path(study_cfg, objective_factory)
    if objective_path is None and (len(devices) > 1 or jobs is not None):
        raise ConfigError(
            "worker processes need an importable objective factory: set study.objective"
        )
    factory = objective_factory or load_objective_factory(str(objective_path))
    resolved = _resolve(cfg)
    sampler = build_sampler(study_cfg.sampler, params)
    pruner = build_pruner(study_cfg.pruner)
    if objective_path == DEFAULT_OBJECTIVE:  # the real trainer: its values and data, now
        from kmnist_sweep import objective as trainer

        trainer.check_inputs(cfg)
        if jobs is None:  # cluster jobs may see other files than this host: they check theirs
            trainer.preload_dataset(cfg, keep=devices == [None])
    out_dir = Path(str(study_cfg.output_dir))
    log_dir = out_dir / "logs" if jobs is None else Path(str(cfg.launcher.folder))  # workers'
    check_writable_dir(out_dir, f"study.output_dir={str(out_dir)!r} cannot be created")
    # Every check of the input is above this line: nothing was created or written so far.
    url = str(study_cfg.storage)
    storage = _storage_for(study_cfg)
    study = create_or_load_study(
        study_cfg, storage, sampler, pruner, search_space=resolved["search_space"]
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(out_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(scrub(resolved))))
    if objective_path == DEFAULT_OBJECTIVE:  # the finder trains our engine; toys need none
        lr_finder.prepare(study, cfg, [p.name for p in params if p.type == "lr_finder"])
    if base_overrides is None:
        base_overrides = hydra_base_overrides(cfg)

    since = datetime.datetime.now()
    timeout = study_cfg.get("timeout")
    deadline = None if timeout is None else time.time() + float(timeout)
    poll = float(study_cfg.get("poll_interval", 1.0))
    done = len(study.get_trials(deepcopy=False, states=FINISHED))
    log.info(
        "study %s in %s: %d/%d trials finished, %d worker(s)%s",
        study.study_name,
        mask_url(url),
        done,
        n_trials,
        len(devices),
        "" if jobs is None and len(devices) == 1 else f", logs in {log_dir}",
    )
    progress = Progress(study, n_trials, str(study_cfg.metric))
    worker_status: list[int] = []
    stopped: BaseException | None = None
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the bar prints one line per trial
    try:
        with stop_on_signals():
            if jobs is None and len(devices) == 1 and devices[0] is None:
                objective = factory(cfg)
                work(
                    study,
                    objective,
                    n_trials,
                    deadline=deadline,
                    since=since,
                    poll=poll,
                    heartbeat=_heartbeat_enabled(storage),
                    lock_path=out_dir / SLOT_LOCK,
                    on_trial_end=lambda: progress.refresh(),
                    **fault_limits(study_cfg),
                )
            else:
                payload = {
                    "cfg": resolved,
                    "objective": objective_path,
                    "since": since.isoformat(),
                    "deadline": deadline,
                }
                if jobs is None:
                    worker_status = _run_workers(
                        payload, devices, out_dir / "logs", progress, poll
                    )
                else:
                    from kmnist_sweep import launcher

                    submitted = launcher.submit_workers(cfg, payload)
                    worker_status = launcher.wait(submitted, progress, poll)
        progress.refresh()
    except (KeyboardInterrupt, SweepStopped) as exc:
        stop_seen(exc)
        stopped = exc  # raised again once the outputs are written
    finally:
        progress.close()
        optuna.logging.set_verbosity(verbosity)
        try:
            _write_results(study, cfg, out_dir, list(base_overrides))
            if objective_path == DEFAULT_OBJECTIVE and cfg.study.get("report", True):
                page = report.report_sweep(study, cfg)
                log.info("report: %s", page)
        except Exception as exc:  # never hide the original error behind a reporting one
            log.warning("could not write %s: %s", out_dir, error_line(exc))
    if isinstance(stopped, KeyboardInterrupt):
        signum = int(getattr(stopped, "signum", signal.SIGINT))
        how = "terminated" if signum == signal.SIGTERM else "interrupted"
        raise Interrupted(
            f"study {study.study_name} {how} at {_finished_text(study, n_trials)} finished "
            "trials; running trials were recorded as failed: run the same command again to resume",
            signum,
        ) from None
    if stopped is not None:
        raise stopped
    try:
        summary = summarize(study, n_trials, mask_url(url), out_dir)
        trials = study.get_trials(deepcopy=False)
    except STORAGE_ERRORS as exc:
        raise SweepStopped(
            f"the storage did not answer at the end of the run ({error_line(exc)}); "
            "run the same command again once it is back"
        ) from None
    finished = summary.complete + summary.pruned
    exhausted = _grid_exhausted(study)
    timed_out = deadline is not None and time.time() >= deadline
    if finished < n_trials and not exhausted and not timed_out:
        _check_failures(trials, since, fault_limits(study_cfg)["max_failed"])
        crashed = [f"worker {i} exited with {rc}" for i, rc in enumerate(worker_status) if rc]
        raise SweepStopped(
            f"study {study.study_name} stopped at {finished}/{n_trials} finished trials"
            + (f" ({'; '.join(crashed)}; see {log_dir})" if crashed else "")
            + ": run the same command again to add the rest"
        )
    return summary


def fault_limits(study_cfg: DictConfig) -> dict[str, Any]:
    """work()'s limits from the study config: failing trials, storage outage (seconds)."""
    max_failed = study_cfg.get("max_failed", 10)
    return {
        "max_failed": None if max_failed is None else int(max_failed),
        "storage_patience": float(study_cfg.get("storage_patience", STORAGE_PATIENCE_S)),
    }


def _finished_text(study: optuna.Study, n_trials: int) -> str:
    try:
        return f"{len(study.get_trials(deepcopy=False, states=FINISHED))}/{n_trials}"
    except STORAGE_ERRORS:
        return f"?/{n_trials} (storage unreachable)"


def _storage_for(study_cfg: DictConfig) -> BaseStorage:
    return open_storage(
        str(study_cfg.storage),
        heartbeat_interval=study_cfg.get("heartbeat_interval"),
        grace_period=study_cfg.get("grace_period"),
        max_retry=study_cfg.get("max_retry", 2),
    )


def _heartbeat_enabled(storage: BaseStorage) -> bool:
    """RDB storages opened with a heartbeat_interval (journal storages have none)."""
    interval = getattr(storage, "get_heartbeat_interval", lambda: None)()
    return interval is not None


def _objective_path(study_cfg: DictConfig, factory: ObjectiveFactory | None) -> str | None:
    """The `module:function` workers import; None for a factory they could not import."""
    if factory is None:
        return str(study_cfg.get("objective", "kmnist_sweep.objective:make_objective"))
    path = f"{factory.__module__}:{factory.__qualname__}"
    try:
        return path if load_objective_factory(path) is factory else None
    except ConfigError:
        return None


def _cluster_jobs(cfg: DictConfig) -> int | None:
    """`launcher=slurm`: how many worker jobs to submit (checked); None: workers run here."""
    launcher_cfg = cfg.get("launcher")
    if launcher_cfg is None or str(launcher_cfg.get("name", "local")) != "slurm":
        return None
    from kmnist_sweep import launcher

    return launcher.check(launcher_cfg)


def worker_devices(cfg: DictConfig) -> list[str | None]:
    """One entry per worker: its CUDA_VISIBLE_DEVICES value, or None (CPU / leave as is).

    `study.workers: auto` = one worker per visible GPU x workers_per_gpu, one without GPUs;
    an integer N = N workers, spread round-robin over the GPUs.
    """
    workers = cfg.study.get("workers", "auto")
    per_gpu = int(cfg.study.get("workers_per_gpu", 1))
    gpus = visible_gpus(str(cfg.get("trainer", {}).get("device", "auto")))
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


# --------------------------------------------------------------------------- workers


def work(
    study: optuna.Study,
    objective: Objective,
    n_trials: int,
    *,
    deadline: float | None = None,
    since: datetime.datetime | None = None,
    poll: float = 1.0,
    heartbeat: bool = True,
    lock_path: Path | None = None,
    on_trial_end: Callable[[], None] | None = None,
    max_failed: int | None = None,
    storage_patience: float = STORAGE_PATIENCE_S,
) -> None:
    """One worker's loop: run trials until the study holds n_trials finished ones.

    Several workers (processes or machines) may run it on one study. A worker starts a
    trial only while finished + running + queued < n_trials, or to take a queued retry;
    otherwise it waits, failing stale trials (dead workers) so their retries get queued.
    Workers on one host decide and create their trial under the file lock `lock_path`, so
    two never take the last free slot; across hosts, the later trial (by number) stands down.

    Faults: a storage that stops answering is retried for `storage_patience` seconds, then
    the worker stops with `SweepStopped` (the study is as the storage last saw it). When
    `max_failed` trials of this run (all workers) have raised an error, the cause is a bug
    rather than bad luck: the worker stops instead of failing every remaining trial.
    SIGTERM is handled as Ctrl-C: the running trial is failed and recorded.
    """
    since = since or datetime.datetime.now()
    slot = _SlotLock(lock_path)

    def guarded(trial: optuna.Trial) -> float:
        slot.release()  # the trial exists now: other workers count it
        mine.append(trial.number)
        try:
            if _taken_before(study, trial.number, since, heartbeat) >= n_trials:
                trial.set_user_attr("surplus", True)
                raise _Surplus(f"study already holds {n_trials} finished or running trials")
            if heartbeat:  # before `worker`: see _fail_unstarted
                cast(Any, study._storage).record_heartbeat(trial._trial_id)
            trial.set_user_attr("worker", os.environ.get("KMNIST_SWEEP_WORKER", "0"))
            with _in_trial():
                return objective(trial)
        except (optuna.TrialPruned, _Surplus):
            raise
        except STORAGE_ERRORS as exc:
            with suppress(*STORAGE_ERRORS):  # back already? then say why it failed
                trial.set_user_attr("storage_error", error_line(exc))
            raise
        except KeyboardInterrupt as exc:
            stop_seen(exc)
            trial.set_user_attr("interrupted", signal.Signals(_signum(exc)).name)
            raise
        except Exception as exc:  # the trial's own failure, counted against max_failed
            trial.set_user_attr("error", error_line(exc))
            raise

    callbacks = [lambda _s, _t: on_trial_end()] if on_trial_end else []
    outage: _Outage | None = None
    mine: list[int] = []  # this worker's trial, while the objective runs
    try:
        with stop_on_signals(defer=True), _quiet_expected_tracebacks():
            while deadline is None or time.time() < deadline:
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
                    _check_failures(trials, since, max_failed)
                    finished = sum(t.state in FINISHED for t in trials)
                    queued = sum(t.state == TrialState.WAITING for t in trials)
                    running = sum(_counts_as_running(t, since, heartbeat) for t in trials)
                    if finished >= n_trials or _grid_exhausted(study):
                        return
                    if queued == 0 and finished + running >= n_trials:
                        if not heartbeat:
                            return  # no heartbeat: nobody fails a dead worker's trial
                        slot.release()
                        time.sleep(poll)  # others still run; one may die and be retried
                        continue
                    with _quiet_optuna_warnings():
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
                    cause = _storage_cause(exc)
                    if cause is None:
                        raise
                    slot.release()
                    outage = outage or _Outage(time.time(), storage_patience)
                    outage.wait(cause)
                finally:
                    slot.release()  # in case the trial was never created (ask failed)
    finally:
        slot.close()


def _storage_cause(exc: BaseException) -> BaseException | None:
    """The lost-storage error behind `exc`: Optuna may raise another error (an assertion in
    its trial clean-up) while handling it."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, STORAGE_ERRORS):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _fail_orphans(study: optuna.Study, trials: Sequence[FrozenTrial], numbers: list[int]) -> None:
    """This worker's trial whose end the storage missed: failed now, not left RUNNING until
    its heartbeat goes stale (nobody would fail it once the study is full)."""
    for t in trials:
        if t.number in numbers and t.state == TrialState.RUNNING:
            study._storage.set_trial_user_attr(t._trial_id, "storage_error", "lost its end")
            with suppress(optuna.exceptions.UpdateFinishedTrialError):
                study.tell(t.number, state=TrialState.FAIL)


def _signum(exc: BaseException) -> int:
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
def _in_trial() -> Iterator[None]:
    raise_pending()
    _Stop.in_trial = True
    try:
        yield
    finally:
        _Stop.in_trial = False


def _send_again(signum: int) -> None:
    if not _Stop.seen.is_set():
        os.kill(os.getpid(), signum)


@contextmanager
def _quiet_expected_tracebacks() -> Iterator[None]:
    """One line, not a traceback, for faults the runner handles: Optuna's heartbeat thread
    dying with the storage (its trial is retried once stale), and a trial failed by Ctrl-C
    or SIGTERM. A trial failing with its own error keeps its traceback: that is a bug."""
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if isinstance(args.exc_value, STORAGE_ERRORS):
            log.warning("heartbeat stopped: %s", error_line(args.exc_value))
        else:
            previous(args)

    def no_interrupt_traceback(record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
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


class _Outage:
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


def error_line(exc: BaseException) -> str:
    """`Type: last line of the message`, passwords masked: what a log or user attr keeps."""
    cause = getattr(exc, "orig", None) or exc.__cause__ or exc
    lines = [line.strip() for line in str(cause).strip().splitlines() if line.strip()]
    return scrub_text(f"{type(cause).__name__}: {lines[0] if lines else ''}")[:500]


def failed_with_error(
    trials: Sequence[FrozenTrial], since: datetime.datetime
) -> list[FrozenTrial]:
    """Trials of this run that raised an error (not dead workers' trials, not pruned ones)."""
    return [
        t
        for t in trials
        if t.state == TrialState.FAIL
        and "error" in t.user_attrs
        and t.datetime_start is not None
        and t.datetime_start >= since
    ]


def _check_failures(
    trials: Sequence[FrozenTrial], since: datetime.datetime, max_failed: int | None
) -> None:
    if max_failed is None:
        return
    failed = failed_with_error(trials, since)
    if len(failed) >= max_failed:
        last = max(failed, key=lambda t: t.number)
        raise SweepStopped(
            f"{len(failed)} trials failed with an error in this run (study.max_failed="
            f"{max_failed}); last, trial {last.number}: {last.user_attrs['error']}; "
            "fix the cause and run the same command again"
        )


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
    with _quiet_optuna_warnings():
        optuna.storages.fail_stale_trials(study)
    _fail_unstarted(study)


def _fail_unstarted(study: optuna.Study) -> None:
    """Fail RUNNING trials that never reached the objective and whose worker is gone.

    Optuna only fails a trial whose heartbeat went stale; one whose worker lost the storage
    between creating it and its first heartbeat has none and would stay RUNNING (and hold a
    slot) for ever. Ours record a heartbeat and then the `worker` attribute before the
    objective starts, so a trial without that attribute after a grace period is such a one."""
    storage = study._storage
    interval = getattr(storage, "get_heartbeat_interval", lambda: None)()
    if interval is None:
        return
    backend = getattr(storage, "_backend", storage)  # Optuna wraps RDBStorage in a cache
    grace = getattr(backend, "grace_period", None) or 2 * interval
    cutoff = datetime.datetime.now() - datetime.timedelta(seconds=grace)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if "worker" not in t.user_attrs and t.datetime_start and t.datetime_start < cutoff:
            storage.set_trial_user_attr(t._trial_id, "storage_error", "never started")
            with suppress(optuna.exceptions.UpdateFinishedTrialError):
                study.tell(t.number, state=TrialState.FAIL)


def _grid_exhausted(study: optuna.Study) -> bool:
    sampler = study.sampler
    return isinstance(sampler, optuna.samplers.GridSampler) and sampler.is_exhausted(study)


def _run_workers(
    payload: dict[str, Any],
    devices: list[str | None],
    log_dir: Path,
    progress: Progress,
    poll: float,
) -> list[int]:
    """Start one process per entry of `devices`, show progress until all exit; their codes."""
    log_dir.mkdir(parents=True, exist_ok=True)
    env = _worker_env(str(payload["objective"]), len(devices))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for index, device in enumerate(devices):
            worker_env = dict(env, KMNIST_SWEEP_WORKER=str(index))
            if device is not None:
                worker_env["CUDA_VISIBLE_DEVICES"] = device
            with open(log_dir / f"worker-{index}.log", "ab") as log_file:
                proc = subprocess.Popen(
                    [sys.executable, "-c", WORKER_ENTRY],
                    stdin=subprocess.PIPE,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=worker_env,
                )
            procs.append(proc)
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(dict(payload, index=index)).encode())
            proc.stdin.close()
        while any(p.poll() is None for p in procs):
            progress.refresh()
            time.sleep(poll)
    except BaseException as exc:
        stop_seen(exc)
        _stop_workers(procs, forward=getattr(exc, "signum", None) == signal.SIGTERM)
        raise
    return [cast(int, p.returncode) for p in procs]


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


def _worker_env(objective_path: str, n_workers: int) -> dict[str, str]:
    """Workers import this package and the objective's from wherever this process did."""
    roots = [os.getcwd(), str(Path(__file__).resolve().parents[1])]
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


def worker_main() -> None:
    """Entry of a worker process: a JSON payload on stdin (config, objective, index)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    worker_run(json.loads(sys.stdin.read()))


def worker_run(payload: dict[str, Any]) -> None:
    """One worker on the study in `payload` (as run_sweep builds it, plus `index`): the loop
    of the runner's worker processes and of the launcher's cluster jobs alike."""
    index = int(payload["index"])
    cfg = OmegaConf.create(payload["cfg"])
    OmegaConf.set_struct(cfg, True)
    study_cfg = cfg.study
    params = parse_space(cfg.search_space, cfg)
    storage = _storage_for(study_cfg)
    study = create_or_load_study(
        study_cfg,
        storage,
        build_sampler(study_cfg.sampler, params, seed_offset=index),
        build_pruner(study_cfg.pruner),
    )
    objective = load_objective_factory(str(payload["objective"]))(cfg)
    log.info("worker %d (pid %d) joins study %s", index, os.getpid(), study.study_name)
    try:
        work(
            study,
            objective,
            int(study_cfg.n_trials),
            deadline=payload.get("deadline"),
            since=datetime.datetime.fromisoformat(payload["since"]),
            poll=float(study_cfg.get("poll_interval", 1.0)),
            heartbeat=_heartbeat_enabled(storage),
            lock_path=Path(str(study_cfg.output_dir)) / SLOT_LOCK,
            **fault_limits(study_cfg),
        )
    except KeyboardInterrupt as exc:
        log.info("worker %d interrupted", index)
        sys.exit(128 + int(getattr(exc, "signum", signal.SIGINT)))
    except SweepStopped as exc:
        log.error("worker %d stopped: %s", index, exc)
        sys.exit(1)
    log.info("worker %d done", index)


# --------------------------------------------------------------------------- progress


class Progress:
    """A study-level bar (finished / total, best so far) fed by polling the storage."""

    def __init__(self, study: optuna.Study, n_trials: int, metric: str) -> None:
        self.study = study
        self.metric = metric
        trials = study.get_trials(deepcopy=False)
        self.seen = {t.number for t in trials if t.state.is_finished()}
        finished = sum(t.state in FINISHED for t in trials)
        self.bar = tqdm(
            total=n_trials,
            initial=min(finished, n_trials),
            desc=study.study_name,
            unit="trial",
            dynamic_ncols=True,
            file=sys.stderr,
        )

    def refresh(self) -> None:
        try:
            trials = self.study.get_trials(deepcopy=False)
        except STORAGE_ERRORS:
            return  # the workers retry the storage; the bar waits for it too
        for t in trials:
            if t.state.is_finished() and t.number not in self.seen:
                self.seen.add(t.number)
                self.bar.write(describe_trial(t, self.metric))
        finished = sum(t.state in FINISHED for t in trials)
        self.bar.n = min(finished, self.bar.total)
        complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
        postfix: dict[str, Any] = {
            "running": sum(t.state == TrialState.RUNNING for t in trials),
            "pruned": sum(t.state == TrialState.PRUNED for t in trials),
        }
        if complete:
            sign = 1.0 if self.study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
            best = max(complete, key=lambda t: sign * cast(float, t.value))
            postfix["best"] = f"{best.value:.4f} (#{best.number})"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def describe_trial(t: FrozenTrial, metric: str) -> str:
    """`trial 7 complete val/acc=0.9120 trainer.batch_size=256 (3.1 s)`."""
    overrides = t.user_attrs.get("overrides") or [f"{k}={v}" for k, v in t.params.items()]
    value = f" {metric}={t.value:.4f}" if t.value is not None else ""
    if t.state == TrialState.PRUNED and t.intermediate_values:
        step = max(t.intermediate_values)
        value = f" at epoch {step}: {metric}={t.intermediate_values[step]:.4f}"
    seconds = f" ({t.duration.total_seconds():.1f} s)" if t.duration else ""
    return f"trial {t.number} {t.state.name.lower()}{value} {' '.join(overrides)}{seconds}"


# --------------------------------------------------------------------------- outputs


def summarize(study: optuna.Study, n_trials: int, storage: str, out_dir: Path) -> SweepSummary:
    trials = study.get_trials(deepcopy=False)
    best = _best_trial(study)
    return SweepSummary(
        study_name=study.study_name,
        storage=storage,
        n_trials=n_trials,
        complete=sum(t.state == TrialState.COMPLETE for t in trials),
        pruned=sum(t.state == TrialState.PRUNED for t in trials),
        failed=sum(t.state == TrialState.FAIL for t in trials),
        best_value=None if best is None else best.value,
        best_trial=None if best is None else best.number,
        best_params={} if best is None else trial_values(best),
        output_dir=out_dir,
    )


def _best_trial(study: optuna.Study) -> FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:
        return None


def trial_values(t: FrozenTrial) -> dict[str, Any]:
    """The config values a trial ran with: from the `overrides` the objective recorded
    (exact, e.g. the LR an lr_finder factor led to), else decoded from its params."""
    recorded = t.user_attrs.get("overrides")
    if recorded:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parsed = OverridesParser.create().parse_overrides(list(recorded))
        return {o.key_or_group: o.value() for o in parsed}
    values: dict[str, Any] = {}
    for name, value in t.params.items():
        if name.endswith(".log2"):
            values[name.removesuffix(".log2")] = 2 ** int(value)
        else:
            values[name] = value
    return values


def hydra_base_overrides(cfg: DictConfig) -> list[str]:
    """Overrides that rebuild this config without the sweep: the command line's own, plus
    every value the sweep file set outside study/search_space (e.g. trainer.epochs=3)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
    except (ImportError, ValueError):
        return []
    task = [o for o in hydra_cfg.overrides.task if not _is_sweep_override(o)]
    try:
        from hydra import compose

        reference = compose(config_name=str(hydra_cfg.job.config_name), overrides=task)
    except Exception:  # no global Hydra (compose outside an app): keep what we know
        return task
    return task + [
        f"{key}={format_override_value(value)}" for key, value in _leaf_diff(reference, cfg)
    ]


def _is_sweep_override(override: str) -> bool:
    key = override.lstrip("+~").split("=", 1)[0]
    return key == "sweep" or key.split(".")[0] in ("study", "search_space", "hydra", "launcher")


def _leaf_diff(reference: DictConfig, cfg: DictConfig) -> list[tuple[str, Any]]:
    """(dotted key, value) where cfg differs from reference, interpolations unresolved."""
    ref = cast(dict[str, Any], OmegaConf.to_container(reference, resolve=False))
    new = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=False))
    out: list[tuple[str, Any]] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        for key, value in b.items():
            name = f"{prefix}{key}"
            if not prefix and key in ("study", "search_space", "hydra", "launcher"):
                continue
            if isinstance(value, dict) and isinstance(a.get(key), dict):
                walk(a[key], value, f"{name}.")
            elif key not in a or a[key] != value:
                out.append((name, value))

    walk(ref, new, "")
    return out


def _write_results(
    study: optuna.Study, cfg: DictConfig, out_dir: Path, base_overrides: list[str]
) -> None:
    trials = study.get_trials(deepcopy=False)
    _write_atomic(out_dir / "trials.csv", trials_csv(trials))
    best = _best_trial(study)
    if best is None:
        return
    _write_atomic(out_dir / "best.yaml", best_yaml(study, cfg, best, base_overrides))


def trials_csv(trials: Sequence[FrozenTrial]) -> str:
    """One row per trial: number, state, value, duration, params, user attributes."""
    rows = []
    for t in trials:
        row: dict[str, Any] = {
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            "duration_s": None if t.duration is None else round(t.duration.total_seconds(), 3),
            "epochs_reported": len(t.intermediate_values),
            "retry_of": t.system_attrs.get("failed_trial"),
        }
        row.update(trial_values(t))
        for key, value in t.user_attrs.items():
            if key == "overrides":
                row[key] = " ".join(value)
            elif isinstance(value, dict):
                row.update({k if "/" in k else f"{key}.{k}": v for k, v in value.items()})
            else:
                row[key] = value
        rows.append(row)
    columns = list(dict.fromkeys(key for row in rows for key in row)) or ["number", "state"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def best_yaml(
    study: optuna.Study, cfg: DictConfig, best: FrozenTrial, base_overrides: Sequence[str]
) -> str:
    values = trial_values(best)
    trial_overrides = list(best.user_attrs.get("overrides") or to_overrides(values))
    searched = {o.split("=", 1)[0] for o in trial_overrides}
    overrides = [o for o in base_overrides if o.lstrip("+~").split("=", 1)[0] not in searched]
    overrides += trial_overrides
    command = "python -m kmnist_sweep " + " ".join(shlex.quote(o) for o in overrides)
    body = {
        "study": study.study_name,
        "storage": mask_url(str(cfg.study.storage)),
        "metric": str(cfg.study.metric),
        "direction": str(cfg.study.direction),
        "value": best.value,
        "trial": best.number,
        "params": values,
        "overrides": overrides,
    }
    header = f"# Best trial of study {study.study_name}. Retrain it with:\n#   {command}\n"
    return header + OmegaConf.to_yaml(OmegaConf.create(body))


def _resolve(cfg: DictConfig) -> dict[str, Any]:
    try:
        return cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
    except Exception as exc:
        raise ConfigError(f"the config does not resolve: {str(exc).splitlines()[0]}") from None


def _write_atomic(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
