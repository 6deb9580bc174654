"""Run a study: open its storage, create or load it, start workers, write sweeps/<study>/.

    summary = run_sweep(cfg)          # cfg composed with +sweep=NAME

`study.n_trials` is the study's total of finished (complete + pruned) trials: a second run
of the same study only adds what is missing. `study.workers` processes share the study
through its storage; a trial whose worker died is failed after `grace_period` seconds
without a heartbeat and queued again (SQLite, PostgreSQL and MySQL storages).
"""

from __future__ import annotations

import datetime
import importlib
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any, cast

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from kmnist_sweep import batch_size, lr_finder, report
from kmnist_sweep.checks import check_choice, check_number, check_writable_dir
from kmnist_sweep.errors import ConfigError, Interrupted, SweepStopped
from kmnist_sweep.faults import (
    STORAGE_PATIENCE_S,
    Outage,
    check_failures,
    error_line,
    in_trial,
    quiet_expected_tracebacks,
    raise_pending,
    signum_of,
    stop_on_signals,
    stop_seen,
)
from kmnist_sweep.outputs import (
    SweepSummary,
    hydra_base_overrides,
    resolved_config,
    summarize,
    write_atomic,
    write_results,
)
from kmnist_sweep.search_space import (
    Param,
    optuna_name,
    parse_space,
    pow2_exponents,
    space_difference,
)
from kmnist_sweep.storage import (
    STORAGE_ERRORS,
    mask_url,
    open_storage,
    quiet_optuna_warnings,
    storage_cause,
)
from kmnist_sweep.tracking import scrub

log = logging.getLogger(__name__)

Objective = Callable[[optuna.Trial], float]
ObjectiveFactory = Callable[[DictConfig], Objective]

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # what counts towards study.n_trials
STOP_WAIT_S = 10.0  # seconds workers get to record their trial after Ctrl-C
SLOT_LOCK = ".slots.lock"  # file under output_dir that workers on one host take turns on
DEFAULT_OBJECTIVE = "kmnist_sweep.objective:make_objective"  # the real trainer, with a report
WORKER_ENTRY = "from kmnist_sweep.runner import worker_main; worker_main()"


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
    with quiet_optuna_warnings():
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
    resolved = resolved_config(cfg)
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
    write_atomic(out_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(scrub(resolved))))
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
            write_results(study, cfg, out_dir, list(base_overrides))
            if objective_path == DEFAULT_OBJECTIVE and cfg.study.get("report", True):
                page = report.report_sweep(study, cfg)
                log.info("report: %s", page)
        except Exception as exc:  # never hide the original error behind a reporting one
            log.warning("could not write %s: %s", out_dir, error_line(exc))
    if isinstance(stopped, KeyboardInterrupt):
        signum = signum_of(stopped)
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
        check_failures(trials, since, fault_limits(study_cfg)["max_failed"])
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
            with in_trial():
                return objective(trial)
        except (optuna.TrialPruned, _Surplus):
            raise
        except STORAGE_ERRORS as exc:
            with suppress(*STORAGE_ERRORS):  # back already? then say why it failed
                trial.set_user_attr("storage_error", error_line(exc))
            raise
        except KeyboardInterrupt as exc:
            stop_seen(exc)
            trial.set_user_attr("interrupted", signal.Signals(signum_of(exc)).name)
            raise
        except Exception as exc:  # the trial's own failure, counted against max_failed
            trial.set_user_attr("error", error_line(exc))
            raise

    callbacks = [lambda _s, _t: on_trial_end()] if on_trial_end else []
    outage: Outage | None = None
    mine: list[int] = []  # this worker's trial, while the objective runs
    try:
        with stop_on_signals(defer=True), quiet_expected_tracebacks():
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
                    check_failures(trials, since, max_failed)
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
                    with quiet_optuna_warnings():
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
                    cause = storage_cause(exc)
                    if cause is None:
                        raise
                    slot.release()
                    outage = outage or Outage(time.time(), storage_patience)
                    outage.wait(cause)
                finally:
                    slot.release()  # in case the trial was never created (ask failed)
    finally:
        slot.close()


def _fail_orphans(study: optuna.Study, trials: Sequence[FrozenTrial], numbers: list[int]) -> None:
    """This worker's trial whose end the storage missed: failed now, not left RUNNING until
    its heartbeat goes stale (nobody would fail it once the study is full)."""
    for t in trials:
        if t.number in numbers and t.state == TrialState.RUNNING:
            _fail_lost(study, t, "lost its end")


def _fail_lost(study: optuna.Study, t: FrozenTrial, why: str) -> None:
    """Fail a RUNNING trial the storage lost track of, saying why (`storage_error`); another
    worker failing it first is fine."""
    study._storage.set_trial_user_attr(t._trial_id, "storage_error", why)
    with suppress(optuna.exceptions.UpdateFinishedTrialError):
        study.tell(t.number, state=TrialState.FAIL)


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
    with quiet_optuna_warnings():
        optuna.storages.fail_stale_trials(study)
    _fail_unstarted(study)


def _fail_unstarted(study: optuna.Study) -> None:
    """Fail RUNNING trials that never reached the objective and whose worker is gone.

    Optuna only fails a trial whose heartbeat went stale; one whose worker lost the storage
    between creating it and its first heartbeat has none and would stay RUNNING (and hold a
    slot) for ever. Ours record a heartbeat and then the `worker` attribute before the
    objective starts, so a trial without that attribute after a grace period is such a one."""
    storage = study._storage
    if not _heartbeat_enabled(storage):
        return
    interval = int(cast(Any, storage).get_heartbeat_interval())
    backend = getattr(storage, "_backend", storage)  # Optuna wraps RDBStorage in a cache
    grace = getattr(backend, "grace_period", None) or 2 * interval
    cutoff = datetime.datetime.now() - datetime.timedelta(seconds=grace)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if "worker" not in t.user_attrs and t.datetime_start and t.datetime_start < cutoff:
            _fail_lost(study, t, "never started")


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
        _stop_workers(procs, forward=signum_of(exc) == signal.SIGTERM)
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
        sys.exit(128 + signum_of(exc))
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
