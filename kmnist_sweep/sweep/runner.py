"""Run a study: plan it (every check, nothing written), open it, let the objective prepare,
run the workers here, in local processes or as SLURM jobs, then write sweeps/<study>/.

    summary = run_sweep(cfg)          # cfg composed with +sweep=NAME and checked

`study.n_trials` is the study's total of finished (complete + pruned) trials: a second run
of the same study only adds what is missing. The runner knows the objective only through
its protocol (sweep/protocol.py): check, prepare, constraint, finish.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from kmnist_sweep.config.check import check_config
from kmnist_sweep.config.search_space import EPOCHS_KEY, Param, to_overrides
from kmnist_sweep.errors import ConfigError, Interrupted, SweepStopped, error_line
from kmnist_sweep.files import check_writable_dir, write_atomic
from kmnist_sweep.masking import mask_url, scrub
from kmnist_sweep.results.outputs import (
    SweepSummary,
    hydra_base_overrides,
    remove_stale_best,
    resolved_config,
    summarize,
    write_results,
)
from kmnist_sweep.sweep import local, slurm
from kmnist_sweep.sweep.budget_run import NO_FINAL_FIT, BudgetRun, FinalFit
from kmnist_sweep.sweep.faults import check_failures, signum_of, stop_on_signals, stop_seen
from kmnist_sweep.sweep.progress import Progress
from kmnist_sweep.sweep.protocol import (
    Factory,
    SweepObjective,
    as_sweep_objective,
    factory_path,
    load_factory,
)
from kmnist_sweep.sweep.storage import STORAGE_ERRORS
from kmnist_sweep.sweep.study import (
    FINISHED,
    grid_exhausted,
    open_sweep_study,
    queue_defaults,
)
from kmnist_sweep.sweep.worker import work
from kmnist_sweep.sweep.worker_spec import WorkerSpec, worker_spec

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """Everything a sweep needs, worked out before anything is opened or written."""

    params: list[Param]  # the parsed search space
    n_trials: int  # finished trials the study should hold
    jobs: int | None  # launcher=slurm: worker jobs to submit; None: workers on this host
    devices: list[str | None]  # local workers: CUDA_VISIBLE_DEVICES of each (None: as is)
    objective_path: str | None  # `module:function` workers import (None: in-process only)
    objective: SweepObjective  # this process's instance: prepare, finish, in-process trials
    resolved: dict[str, Any]  # the resolved config, what workers receive
    out_dir: Path  # sweeps/<study>
    log_dir: Path  # worker logs (local) or submitit's folder (SLURM)

    @property
    def in_process(self) -> bool:
        return self.jobs is None and self.devices == [None]


def run_sweep(
    cfg: DictConfig,
    objective_factory: Factory | None = None,
    base_overrides: Sequence[str] | None = None,
    started: float | None = None,
    final_fit: FinalFit | None = None,
) -> SweepSummary:
    """Run the study in `cfg.study` over `cfg.search_space` until it holds n_trials trials,
    or, with `study.budget`, plan trials until the budget allows only the final fit, then
    fit and bundle the answer.

    `objective_factory(cfg)` builds the objective (by default the one `debug.objective`
    names). `base_overrides` are the command-line overrides best.yaml repeats (default:
    from Hydra's runtime config when there is one). `started`: when the command started
    (Unix time), where a budget's clock starts (default: now). `final_fit`: `final`'s
    run_final, which a budgeted sweep ends with.
    """
    started = time.time() if started is None else started
    plan = plan_sweep(cfg, objective_factory)
    if final_fit is None and cfg.study.get("budget") is not None:
        raise ConfigError(NO_FINAL_FIT)
    # Every check of the input is done by here (the sampler's and pruner's settings first
    # thing in open_sweep_study): nothing was created or written so far.
    study = open_sweep_study(
        cfg.study,
        plan.params,
        0,
        plan.objective.constraint,
        search_space=plan.resolved["search_space"],
    )
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(
        plan.out_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(scrub(plan.resolved)))
    )
    remove_stale_best(study, plan.out_dir)  # even if this run is killed before its end
    if cfg.study.start_from_defaults:
        start_from_defaults(study, plan.params, cfg)
    plan.objective.prepare(study)
    if base_overrides is None:
        base_overrides = hydra_base_overrides(cfg)

    run = BudgetRun.start(cfg, study, started, plan.jobs or len(plan.devices))
    end = None if run is None else run.budget.end
    spec = worker_spec(cfg, plan.resolved, plan.objective_path, end)
    log.info(
        "study %s in %s: %d/%d trials finished, %d worker(s)%s",
        study.study_name,
        mask_url(str(cfg.study.storage)),
        len(study.get_trials(deepcopy=False, states=FINISHED)),
        plan.n_trials,
        plan.jobs or len(plan.devices),
        "" if plan.in_process else f", logs in {plan.log_dir}",
    )
    worker_status: list[int] = []
    stopped: BaseException | None = None
    status = None if run is None else run.progress_status  # a budget's phase, time left
    progress = Progress(study, plan.n_trials, str(cfg.study.metric), status)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the bar prints one line per trial
    try:
        with stop_on_signals():
            worker_status = run_workers(cfg, plan, study, progress, spec, run)
        progress.refresh()
    except (KeyboardInterrupt, SweepStopped) as exc:
        stop_seen(exc)
        stopped = exc  # raised again once the outputs are written
    finally:
        progress.close()
        optuna.logging.set_verbosity(verbosity)
        chosen = None if run is None else run.search_done()
        # A budgeted sweep's report waits for its final fit, whose figure it shows.
        write_outputs(study, cfg, plan, list(base_overrides), chosen, report=run is None)
    if stopped is not None:
        raise _as_stop(stopped, study, plan.n_trials) from None
    summary = check_total(study, cfg, plan, spec, worker_status, run is not None)
    if run is None:
        return summary
    assert final_fit is not None
    return run.finish(summary, plan.out_dir, lambda: plan.objective.finish(study), final_fit)


def check_recipe_kept(snapshot: Path, name: str) -> None:
    """A study whose config.yaml predates trainer.ema validated its trials' epochs without
    the weight average; going on with the new default, the pruner would judge new trials'
    averaged epochs against them. The command line must say which it wants."""
    try:
        old = OmegaConf.load(snapshot) if snapshot.is_file() else None
    except Exception:  # unreadable: not ours to judge here
        return
    if not isinstance(old, DictConfig) or "ema" in old.get("trainer", {"ema": "?"}):
        return
    if "trainer.ema" in command_line_keys():
        return
    raise ConfigError(
        f"study {name!r} ran its trials without a weight average (its config.yaml predates "
        "trainer.ema): add trainer.ema=0 to go on as they ran, or trainer.ema=0.99 to "
        "average from here on"
    )


def command_line_keys() -> set[str]:
    """Keys the command line set (empty outside a Hydra app)."""
    if not HydraConfig.initialized():
        return set()
    return {o.lstrip("+~").split("=", 1)[0] for o in HydraConfig.get().overrides.task}


def plan_sweep(cfg: DictConfig, objective_factory: Factory | None) -> Plan:
    """Check the config (the one pass, config/check.py) and work out the sweep; the objective
    checks its own input here (the real one loads its data). Writes nothing."""
    study_cfg = cfg.study
    params = check_config(cfg)
    if not params:
        raise ConfigError("search_space is empty: pick a sweep, e.g. +sweep=batchsize")
    jobs = slurm.check(cfg) if _on_slurm(cfg) else None
    devices: list[str | None] = local.worker_devices(cfg) if jobs is None else []
    if objective_factory is None:
        objective_path: str | None = str(cfg.debug.objective)
        factory = load_factory(str(objective_path))
    else:
        objective_path, factory = factory_path(objective_factory), objective_factory
    if objective_path is None and (len(devices) > 1 or jobs is not None):
        raise ConfigError(
            "worker processes need an importable objective factory: set debug.objective"
        )
    if jobs is None and not local.visible_gpus(str(cfg.trainer.device)):
        warning = cpu_cost_warning(cfg, params)
        if warning:
            log.warning(warning)
    objective = as_sweep_objective(factory(cfg))
    if jobs is None:  # cluster jobs may see other files than this host: they check theirs
        objective.check()
    out_dir = Path(str(study_cfg.output_dir))
    check_writable_dir(out_dir, f"study.output_dir={str(out_dir)!r} cannot be created")
    check_recipe_kept(out_dir / "config.yaml", str(study_cfg.name))
    log_dir = out_dir / "logs" if jobs is None else Path(str(cfg.launcher.folder))
    return Plan(
        params=params,
        n_trials=int(study_cfg.n_trials),
        jobs=jobs,
        devices=devices,
        objective_path=objective_path,
        objective=objective,
        resolved=resolved_config(cfg),
        out_dir=out_dir,
        log_dir=log_dir,
    )


def start_from_defaults(study: optuna.Study, params: list[Param], cfg: DictConfig) -> None:
    """Queue the config's values as a new study's trial 0 and say so (nothing on resume)."""
    queued = queue_defaults(study, params, cfg)
    if queued is None:
        return
    values, outside = queued
    log.info("trial 0 runs the config's own values: %s", " ".join(to_overrides(values)))
    if outside:
        log.warning(
            "study.start_from_defaults: the config's %s lie outside search_space; "
            "the sampler picks them for trial 0",
            ", ".join(outside),
        )


CPU_EPOCHS = 15  # epochs above which one trial is long for a CPU


def cpu_cost_warning(cfg: DictConfig, params: list[Param]) -> str | None:
    """A line when a sweep on a CPU holds trials that take hours (+sweep=full's do): the
    searched values and the fixed ones alike (`+sweep=lr model=resnet50` counts)."""
    searched = {p.name: p for p in params}

    def values(key: str) -> list[Any]:  # every value a trial may run `key` with
        p = searched.get(key)
        if p is None:
            return [OmegaConf.select(cfg, key)]
        return list(p.choices) if p.type == "categorical" else [p.high]

    heavy = []
    if "resnet50" in values("model.arch"):
        heavy.append("resnet50")
    if "small" in values("model.stem"):
        heavy.append("the small stem (16x the activations of the imagenet stem)")
    epochs = max((int(v) for v in values(EPOCHS_KEY) if isinstance(v, int | float)), default=0)
    if epochs > CPU_EPOCHS:
        heavy.append(f"{epochs} epochs")
    if not heavy:
        return None
    return (
        f"no GPU: this sweep's trials include {', '.join(heavy)}; one such trial can take "
        "hours on a CPU: narrow the space (++search_space.KEY...), use +sweep=full_cpu (the "
        "full search sized for a CPU) or bound the wall time with study.timeout=SECONDS"
    )


def run_workers(
    cfg: DictConfig,
    plan: Plan,
    study: optuna.Study,
    progress: Progress,
    spec: WorkerSpec,
    run: BudgetRun | None = None,
) -> list[int]:
    """Run the workers until the study is full or a budget's planner stops them; the exit
    status of each worker process or job ([] when the single worker ran in this process)."""
    if plan.in_process:
        planner = None if run is None else run.budget.step
        work(study, plan.objective, spec, on_trial_end=progress.refresh, planner=planner)
        return []
    if plan.jobs is None:
        restarts = int(cfg.launcher.max_worker_restarts)
        return local.run_workers(spec, plan.devices, plan.log_dir, progress, restarts)
    return slurm.wait(slurm.submit_workers(cfg, spec), progress, spec.poll)


def write_outputs(
    study: optuna.Study,
    cfg: DictConfig,
    plan: Plan,
    base_overrides: list[str],
    chosen: int | None = None,
    report: bool = True,
) -> None:
    """trials.csv, best.yaml (trial `chosen`, else the best), then the objective's own
    (the report); a failure here is a warning, never an error that would hide why the
    sweep stopped."""
    try:
        write_results(study, cfg, plan.out_dir, base_overrides, chosen)
        if report:
            plan.objective.finish(study)
    except Exception as exc:
        log.warning("could not write %s: %s", plan.out_dir, error_line(exc))


def check_total(
    study: optuna.Study,
    cfg: DictConfig,
    plan: Plan,
    spec: WorkerSpec,
    worker_status: list[int],
    budgeted: bool = False,
) -> SweepSummary:
    """The summary once the study holds its total (or the grid, the time or the budget ran
    out); else SweepStopped saying why and that the same command resumes it."""
    try:
        storage = mask_url(str(cfg.study.storage))
        summary = summarize(study, cfg, plan.n_trials, storage, plan.out_dir)
        trials = study.get_trials(deepcopy=False)
    except STORAGE_ERRORS as exc:
        raise SweepStopped(
            f"the storage did not answer at the end of the run ({error_line(exc)}); "
            "run the same command again once it is back"
        ) from None
    finished = summary.complete + summary.pruned
    # A budget's planner stops the workers when no trial fits: that is its end, not a stop.
    timed_out = budgeted or (spec.deadline is not None and time.time() >= spec.deadline)
    if finished < plan.n_trials and not grid_exhausted(study) and not timed_out:
        check_failures(trials, spec.since, spec.max_failed)
        crashed = [f"worker {i} exited with {rc}" for i, rc in enumerate(worker_status) if rc]
        raise SweepStopped(
            f"study {study.study_name} stopped at {finished}/{plan.n_trials} finished trials"
            + (f" ({'; '.join(crashed)}; see {plan.log_dir})" if crashed else "")
            + ": run the same command again to add the rest"
        )
    return summary


def _as_stop(stopped: BaseException, study: optuna.Study, n_trials: int) -> BaseException:
    """A Ctrl-C or SIGTERM as the Interrupted the CLI prints; other stops unchanged."""
    if not isinstance(stopped, KeyboardInterrupt):
        return stopped
    signum = signum_of(stopped)
    how = "terminated" if signum == signal.SIGTERM else "interrupted"
    try:
        count = f"{len(study.get_trials(deepcopy=False, states=FINISHED))}/{n_trials}"
    except STORAGE_ERRORS:
        count = f"?/{n_trials} (storage unreachable)"
    return Interrupted(
        f"study {study.study_name} {how} at {count} finished trials; running trials were "
        "recorded as failed: run the same command again to resume",
        signum,
    )


def _on_slurm(cfg: DictConfig) -> bool:
    return str(cfg.launcher.name) == "slurm"
