"""An Optuna study from the config: its storage, sampler and pruner, created or loaded.

storage = open_study_storage(cfg.study)
study = create_or_load_study(cfg.study, storage, build_sampler(...), build_pruner(...))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from kmnist_sweep import trial_attrs
from kmnist_sweep.config.check import objectives
from kmnist_sweep.config.schema import STEP_PRUNERS
from kmnist_sweep.config.search_space import Param, optuna_name, pow2_exponents, space_difference
from kmnist_sweep.errors import ConfigError
from kmnist_sweep.masking import mask_url
from kmnist_sweep.sweep import optuna_internals
from kmnist_sweep.sweep.storage import open_storage, quiet_optuna_warnings

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # what counts towards study.n_trials
Constraint = Callable[[FrozenTrial], Sequence[float]]


def build_sampler(
    sampler_cfg: DictConfig,
    params: Sequence[Param] = (),
    seed_offset: int = 0,
    constraint: Constraint | None = None,
) -> optuna.samplers.BaseSampler:
    """The sampler named by `study.sampler.type`; worker i passes seed_offset=i. `constraint`
    (the objective's) reaches the samplers that accept one: TPE and GP."""
    kind = str(sampler_cfg.type)
    seed = sampler_cfg.seed
    seed = None if seed is None else int(seed) + seed_offset
    n_startup = int(sampler_cfg.n_startup_trials)
    with quiet_optuna_warnings():
        if kind == "tpe":
            # constant_liar: parallel workers treat running trials as bad, so they spread out.
            return optuna.samplers.TPESampler(
                seed=seed,
                n_startup_trials=n_startup,
                constant_liar=True,
                constraints_func=constraint,
            )
        if kind == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if kind == "grid":
            return optuna.samplers.GridSampler(grid_space(params), seed=seed)
        if kind == "cmaes":  # the config check made sure the cmaes package is there
            return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=n_startup)
        if kind == "gp":
            return optuna.samplers.GPSampler(
                seed=seed, n_startup_trials=n_startup, constraints_func=constraint
            )
    raise ValueError(f"study.sampler.type={kind!r} passed the config check")


def batch_size_constraint(trial: FrozenTrial) -> list[float]:
    """The objective's constraint for TPE and GP (<= 0 feasible). Only a trial that fitted at
    no batch size is infeasible; one that halved and then trained (and was perhaps pruned for
    its metric) is feasible, so samplers judge it by its value, not as "does not fit"."""
    requested, _ = trial_attrs.batch_sizes(trial.user_attrs)
    if trial.user_attrs.get(trial_attrs.BATCH_FITTED, True) or not requested:
        return [0.0]
    return [math.log2(requested) + 1]  # the larger the request, the further from fitting


def grid_space(params: Sequence[Param]) -> dict[str, list[Any]]:
    """Every value of each param, under the names the objective suggests them by."""
    grid: dict[str, list[Any]] = {}
    for p in params:
        if not p.searched:
            continue
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


def build_pruner(
    pruner_cfg: DictConfig, longest_epochs: int | None = None, shortest_epochs: int | None = None
) -> optuna.pruners.BasePruner:
    """The pruner named by `study.pruner.type`; its resource is the epoch.

    When the number of epochs is searched (`shortest_epochs` to `longest_epochs`), trials
    report at the percent of their own schedule done (sweep/objective.py; on a 10% grid
    for the median and percentile pruners, which compare trials only at a step they share;
    at the rungs of `rung_percents` for successive halving and Hyperband), and the resource
    is that percent: Hyperband's budget is the whole schedule (100) whatever its length,
    and the median and percentile pruners' warm-up is counted in each trial's own epochs
    by the objective."""
    kind = str(pruner_cfg.type)
    by_fraction = longest_epochs is not None
    if kind == "none":
        return optuna.pruners.NopPruner()
    if kind in STEP_PRUNERS:
        jury = {
            "n_startup_trials": int(pruner_cfg.n_startup_trials),
            # By fraction the objective also holds each trial back for its own first epochs.
            "n_warmup_steps": int(pruner_cfg.n_warmup_steps),
            # With 1, one finished trial is the whole jury at a step: after a strong trial 0
            # (study.start_from_defaults) every run that trails it mid-schedule is stopped.
            "n_min_trials": int(pruner_cfg.n_min_trials),
        }
        if kind == "median":
            return optuna.pruners.MedianPruner(**jury)
        # Optuna's jury is the complete trials only, the survivors of earlier pruning, so a
        # median rises as a study goes on; a high percentile stops only the clear losers.
        return optuna.pruners.PercentilePruner(float(pruner_cfg.percentile), **jury)
    min_resource = int(pruner_cfg.min_resource)
    reduction = int(pruner_cfg.reduction_factor)
    if longest_epochs is not None:
        min_resource = first_rung(min_resource, shortest_epochs, longest_epochs)
    if kind == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=min_resource, reduction_factor=reduction
        )
    if kind == "hyperband":
        max_resource = 100 if by_fraction else int(pruner_cfg.max_resource)
        return optuna.pruners.HyperbandPruner(
            min_resource=min_resource, max_resource=max_resource, reduction_factor=reduction
        )
    raise ValueError(f"study.pruner.type={kind!r} passed the config check")


def first_rung(min_resource: int, shortest_epochs: int | None, longest_epochs: int) -> int:
    """The first rung, in percent of a schedule, when epochs are searched: `min_resource`
    epochs of the longest schedule, but not before the first epoch of the shortest (when
    known), so that every trial has a report within half an epoch of every rung."""
    share = math.ceil(100 * min_resource / max(longest_epochs, 1))
    first = 0 if shortest_epochs is None else math.ceil(100 / max(shortest_epochs, 1))
    return max(1, share, first)


def rung_percents(pruner_cfg: DictConfig, params: Sequence[Param]) -> list[int] | None:
    """Successive halving and Hyperband with searched epochs: the percents of a schedule
    (below 100) at which trials meet, one per rung; None for other pruners or fixed epochs.
    The objective reports there, so a 2-epoch and a 30-epoch trial enter a rung at the same
    share of their schedules (Optuna records a rung at the first report at or above it)."""
    span = epochs_searched(params)
    if str(pruner_cfg.type) not in ("halving", "hyperband") or span is None:
        return None
    rung = first_rung(int(pruner_cfg.min_resource), *span)
    rungs = []
    while rung < 100:
        rungs.append(rung)
        rung *= int(pruner_cfg.reduction_factor)
    return rungs


def report_steps(pruner_cfg: DictConfig, params: Sequence[Param], epochs: int) -> dict[int, int]:
    """Epoch -> the pruner step a trial of `epochs` epochs reports at (an epoch missing
    reports nothing): the epoch itself, or with searched epochs a percent of the schedule
    (`rung_steps` for successive halving and Hyperband, `grid_steps` for the others)."""
    rungs = rung_percents(pruner_cfg, params)
    if rungs is not None:
        return rung_steps(epochs, rungs)
    if epochs_searched(params) is not None:
        return grid_steps(epochs, 10 if str(pruner_cfg.type) in STEP_PRUNERS else 1)
    return {e: e for e in range(1, epochs + 1)}


def grid_steps(epochs: int, grid: int) -> dict[int, int]:
    """Epoch -> the pruner step it reports at: the percent of a schedule of `epochs` done,
    on a grid of `grid` percent. The median pruner compares trials only at a step they all
    reported, so its grid is 10: a 12-epoch run then meets 10- and 8-epoch runs at most
    steps. Each step goes to the epoch nearest it (the earlier on a tie); an epoch nearest
    to no step reports nothing, so a step never holds a value from further from it than
    needed, and none is below `grid` (the first epochs of a long run report nothing)."""
    nearest: dict[int, int] = {}  # step -> epoch
    for epoch in range(1, epochs + 1):
        # The grid point nearest 100 * epoch / epochs, half up, in integers (no float ties).
        step = max(grid, grid * ((200 * epoch + grid * epochs) // (2 * grid * epochs)))
        distance = abs(100 * epoch - step * epochs)  # in units of 1/epochs percent
        if step not in nearest or distance < abs(100 * nearest[step] - step * epochs):
            nearest[step] = epoch
    return {epoch: step for step, epoch in nearest.items()}


def rung_steps(epochs: int, rungs: list[int]) -> dict[int, int]:
    """Epoch -> step for successive halving and Hyperband by fraction: each rung (a percent
    of the schedule) at the epoch nearest it, the last epoch at 100. Optuna enters a trial in
    every rung at or below the step it reports, so two rungs nearest one epoch share it."""
    steps = {}
    for rung in rungs:  # ascending: the later rung of two at one epoch stands
        epoch = max(1, (2 * rung * epochs + 100) // 200)  # nearest, half up, in integers
        if epoch < epochs:
            steps[epoch] = rung
    if epochs > 0:
        steps[epochs] = 100
    return steps


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
    Its directions and metric names are those of `objectives(study_cfg)`: several when
    study.directions and study.metrics are set (a multi-objective study).
    """
    name = str(study_cfg.name)
    pairs = objectives(study_cfg)
    metrics, directions = [m for m, _ in pairs], [d for _, d in pairs]
    # One objective keeps its metric as a string (as studies made before several existed).
    metric: str | list[str] = metrics if len(metrics) > 1 else metrics[0]
    try:
        study_id: int | None = storage.get_study_id_from_name(name)
    except KeyError:
        study_id = None
    if study_id is not None:
        old_directions = [d.name.lower() for d in storage.get_study_directions(study_id)]
        if old_directions != directions:
            raise ConfigError(
                f"study {name!r} already exists in {mask_url(str(study_cfg.storage))} with "
                f"direction {'/'.join(old_directions)}, not {'/'.join(directions)}: "
                "pick another study.name"
            )
        attrs = storage.get_study_user_attrs(study_id)
        old_metric = attrs.get(trial_attrs.STUDY_METRIC)
        if old_metric is not None and old_metric != metric:
            raise ConfigError(
                f"study {name!r} already exists in {mask_url(str(study_cfg.storage))} with "
                f"metric {_metric_text(old_metric)}, not {_metric_text(metric)}: "
                "pick another study.name"
            )
        old_space = attrs.get(trial_attrs.STUDY_SEARCH_SPACE)
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
        directions=cast(Any, directions),
        sampler=sampler,
        pruner=pruner,
        load_if_exists=True,
    )
    if study_id is None:
        study.set_user_attr(trial_attrs.STUDY_METRIC, metric)
        with quiet_optuna_warnings():  # "experimental" since Optuna 3.2
            study.set_metric_names(metrics)  # optuna-dashboard shows val/acc, not "Objective 0"
    if search_space is not None and trial_attrs.STUDY_SEARCH_SPACE not in study.user_attrs:
        study.set_user_attr(trial_attrs.STUDY_SEARCH_SPACE, search_space)
    return study


def _metric_text(metric: Any) -> str:
    """val/acc, or [val/acc, speed/train_s] for a multi-objective study."""
    return f"[{', '.join(map(str, metric))}]" if isinstance(metric, list) else str(metric)


def open_study_storage(study_cfg: DictConfig) -> BaseStorage:
    return open_storage(
        str(study_cfg.storage),
        heartbeat_interval=study_cfg.heartbeat_interval,
        grace_period=study_cfg.grace_period,
        max_retry=study_cfg.max_retry,
    )


def open_sweep_study(
    study_cfg: DictConfig,
    params: Sequence[Param],
    worker: int,
    constraint: Constraint | None,
    search_space: dict[str, Any] | None = None,
) -> optuna.Study:
    """The study a sweep's worker `worker` runs: its sampler (seeded per worker) and pruner
    are built first, so a bad sampler or pruner setting stops before the storage is opened."""
    sampler = build_sampler(study_cfg.sampler, params, worker, constraint)
    shortest, longest = epochs_searched(params) or (None, None)
    pruner = build_pruner(study_cfg.pruner, longest, shortest)
    storage = open_study_storage(study_cfg)
    return create_or_load_study(study_cfg, storage, sampler, pruner, search_space=search_space)


def queue_defaults(
    study: optuna.Study, params: Sequence[Param], cfg: DictConfig
) -> tuple[dict[str, Any], list[str]] | None:
    """`study.start_from_defaults`: queue the config's own values as the first trial of a
    study that holds none yet. Returns (the config values queued, keys left to the sampler),
    or None when nothing was queued: a resumed study is left as it is, so running a sweep
    again never adds it twice."""
    if study.get_trials(deepcopy=False):
        return None
    point, outside = config_point(params, cfg)
    if not point:
        return None
    # skip_if_exists: two runners that start one new study at once queue it once, mostly.
    study.enqueue_trial(
        point, user_attrs={trial_attrs.QUEUED: "config defaults"}, skip_if_exists=True
    )
    values = {p.name: OmegaConf.select(cfg, p.name) for p in params if p.type != "lr_finder"}
    return {k: v for k, v in values.items() if k not in outside}, outside


def config_point(params: Sequence[Param], cfg: DictConfig) -> tuple[dict[str, Any], list[str]]:
    """The config's own values as a point of the space, under the names and types the
    objective suggests them by: pow2 as its exponent, an lr_finder key as factor 1 (the
    finder's LR itself). Returns (point, keys left out): a value outside its range, grid or
    choices is left to the sampler, so the queued trial stays inside the space."""
    point: dict[str, Any] = {}
    outside: list[str] = []
    for p in params:
        if p.type == "lr_finder":
            if p.searched:
                point[optuna_name(p)] = 1.0
            continue
        value = _inside(p, OmegaConf.select(cfg, p.name))
        if value is _OUTSIDE:
            outside.append(p.name)
        else:
            point[optuna_name(p)] = value
    return point, outside


_OUTSIDE = object()


def _inside(p: Param, value: Any) -> Any:
    """`value` as the suggest call for `p` returns it, or _OUTSIDE."""
    if p.type == "categorical":  # by type too: True == 1 and 0 == 0.0 in Python
        same = [c for c in p.choices if type(c) is type(value) and c == value]
        return same[0] if same else _OUTSIDE
    if isinstance(value, bool) or not isinstance(value, int | float):
        return _OUTSIDE
    if p.type == "pow2":
        lo, hi = pow2_exponents(p)
        exponent = int(value).bit_length() - 1
        return exponent if value == 2**exponent and lo <= exponent <= hi else _OUTSIDE
    if p.type == "int" and value != int(value):
        return _OUTSIDE
    if not p.low <= value <= p.high:
        return _OUTSIDE
    if p.step is not None:  # on the grid, with Optuna's own tolerance
        k = (value - p.low) / p.step
        if abs(k - round(k)) > 1e-8:
            return _OUTSIDE
    return int(value) if p.type == "int" else float(value)


def epochs_searched_up_to(params: Sequence[Param]) -> int | None:
    """The longest schedule a search space asks for, when it searches trainer.epochs."""
    span = epochs_searched(params)
    return None if span is None else span[1]


def epochs_searched(params: Sequence[Param]) -> tuple[int, int] | None:
    """(shortest, longest) schedule a search space asks for, when it searches trainer.epochs."""
    for p in params:
        if p.name == "trainer.epochs":
            if p.type == "categorical":
                return int(min(p.choices)), int(max(p.choices))
            return int(p.low), int(p.high)
    return None


def heartbeat_enabled(storage: BaseStorage) -> bool:
    """RDB storages opened with a heartbeat_interval (journal storages have none)."""
    return optuna_internals.heartbeat_interval(storage) is not None


def grid_exhausted(study: optuna.Study) -> bool:
    sampler = study.sampler
    return isinstance(sampler, optuna.samplers.GridSampler) and sampler.is_exhausted(study)
