"""The one check pass over a composed config, before any data is read or study touched.

    params = check_config(cfg)    # the parsed search space; a ConfigError names the bad key

Order: the search space (its form, then each searched key's bounds or choices against the
schema), every other key against the schema (config/schema.py), then the rules between
keys, then what only this machine can tell (device, bf16, optional packages). What can only
be checked by opening something (data files, the storage, the output folder, the objective's
module) is checked by the sweep's plan, still before anything is written.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kmnist_sweep import trial_attrs
from kmnist_sweep.config.device import pick_device, use_bf16
from kmnist_sweep.config.keys import did_you_mean, leaf_keys
from kmnist_sweep.config.schema import SCHEMA, SECTIONS, Key
from kmnist_sweep.config.search_space import Param, parse_space, pow2_exponents
from kmnist_sweep.errors import ConfigError

# Keys whose value is a mapping of the user's own: its entries are not config keys.
DICT_VALUED = {"launcher.additional_parameters", "debug.inject_oom"}

_ABSENT = object()


def check_config(cfg: DictConfig) -> list[Param]:
    """Check every key of `cfg`; return the parsed search space."""
    params = parse_space(cfg.get("search_space") or {}, cfg)
    searched = {p.name: p for p in params}
    check_unknown_keys(cfg)
    for key, rule in SCHEMA.items():
        if key in searched:
            check_searched(searched[key], rule)
            continue
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is not _ABSENT:
            rule.check(key, value)
    check_batch_sizes(cfg, searched.get("trainer.batch_size"))
    check_pruner(cfg.study.pruner, searched.get("trainer.epochs"))
    check_start(cfg.study)
    check_objectives(cfg)
    check_budget(cfg.study)
    check_data(cfg.data)
    check_lr_finder(cfg.lr_finder)
    check_machine(cfg)
    return params


def check_unknown_keys(cfg: DictConfig) -> None:
    """A key added to one of our sections (`+trainer.lr_max=...`) that nothing reads."""
    for section in SECTIONS:
        node = cfg.get(section)
        if not isinstance(node, DictConfig):
            continue
        for key in leaf_keys(node, f"{section}.", keep=DICT_VALUED):
            if key not in SCHEMA:
                raise ConfigError(f"{key}: no such config key{did_you_mean(key, SCHEMA)}")


def check_searched(param: Param, rule: Key) -> None:
    """A searched key's bounds or choices, each as its config value would be checked."""
    where = f"search_space.{param.name}"
    if param.type == "categorical":
        for choice in param.choices:
            rule.check(f"{where}.choices", choice)
    elif param.type in ("float", "int"):
        rule.check(f"{where}.low", param.low)
        rule.check(f"{where}.high", param.high)
    # pow2 bounds: check_batch_sizes; lr_finder factors multiply the finder's LR.


def check_batch_sizes(cfg: DictConfig, searched: Param | None) -> None:
    """Batch sizes are powers of two within [batch_size.min, batch_size.max]."""
    lo, hi = int(cfg.batch_size.min), int(cfg.batch_size.max)
    if lo > hi:
        raise ConfigError(f"batch_size.min={lo} is above batch_size.max={hi}")
    sizes: list[tuple[str, Any]] = [("lr_finder.batch_size", cfg.lr_finder.batch_size)]
    if searched is not None and searched.type == "pow2":
        sizes += [("search_space.trainer.batch_size", 2**e) for e in pow2_exponents(searched)]
    else:
        sizes.insert(0, ("trainer.batch_size", cfg.trainer.batch_size))
    for key, value in sizes:
        if not lo <= value <= hi:
            raise ConfigError(
                f"{key}={value} is outside batch_size.min={lo} .. batch_size.max={hi}"
            )


def check_pruner(pruner_cfg: DictConfig, epochs: Param | None) -> None:
    kind = str(pruner_cfg.type)
    # With searched epochs, successive halving and Hyperband meet trials at the same share
    # of their schedules (their rungs), and a schedule of one epoch has no share but its end.
    shortest = None if epochs is None else min(epochs.choices or [epochs.low])
    if kind in ("halving", "hyperband") and shortest is not None and shortest < 2:
        raise ConfigError(
            f"study.pruner.type={kind} compares trials at the same share of their "
            f"schedules, and search_space.trainer.epochs starts at {shortest:g}: a schedule "
            "that short has no share but its end; search epochs from 2, or use the median "
            "pruner"
        )
    # The schema bounds each key; Hyperband's two resources must also be in order.
    min_resource, max_resource = int(pruner_cfg.min_resource), int(pruner_cfg.max_resource)
    if kind == "hyperband" and max_resource < min_resource:
        raise ConfigError(
            f"study.pruner.max_resource={max_resource} (epochs) is below "
            f"min_resource={min_resource}"
        )


def check_start(study_cfg: DictConfig) -> None:
    # A grid sampler walks its grid whatever was queued: the extra trial would not count.
    if study_cfg.start_from_defaults and str(study_cfg.sampler.type) == "grid":
        raise ConfigError(
            "study.start_from_defaults=true does not go with study.sampler.type=grid: "
            "the grid already holds every value"
        )


def check_budget(study_cfg: DictConfig) -> None:
    """study.budget plans trials by one ranking and stops on its own clock: a second clock,
    several objectives or a fixed grid would each undo the plan."""
    if study_cfg.get("budget") is None:
        return
    if study_cfg.get("timeout") is not None:
        raise ConfigError(
            "study.budget and study.timeout are both set: the budget already ends the sweep "
            "on time, with its final fit; set one of them"
        )
    if study_cfg.get("directions") is not None:
        raise ConfigError(
            "study.budget ranks trials by one metric to promote them: it does not go with a "
            "multi-objective study (study.directions)"
        )
    if str(study_cfg.sampler.type) == "grid":
        raise ConfigError(
            "study.budget chooses which trials to run: it does not go with "
            "study.sampler.type=grid; use tpe or random"
        )


def objectives(study_cfg: DictConfig) -> list[tuple[str, str]]:
    """(metric, direction) of each objective, in the order of the trial's values:
    study.metrics and study.directions when set, else [(study.metric, study.direction)]."""
    metrics, directions = study_cfg.get("metrics"), study_cfg.get("directions")
    if metrics is None or directions is None:
        return [(str(study_cfg.metric), str(study_cfg.direction))]
    return [(str(m), str(d)) for m, d in zip(metrics, directions, strict=True)]


def validation_metrics(data_metric: str) -> list[str]:
    """What the engine measures on the validation split every epoch: val/bacc only where
    data.metric=bacc (it adds the balanced-accuracy metric for that data alone)."""
    return ["val/acc", "val/loss"] + (["val/bacc"] if data_metric == "bacc" else [])


def objective_metrics(data_metric: str) -> list[str]:
    """The keys a multi-objective study may optimise: the validation metrics, and what a
    trial cost (trial_attrs.COSTS)."""
    return validation_metrics(data_metric) + list(trial_attrs.COSTS)


def check_objectives(cfg: DictConfig) -> None:
    """study.directions and study.metrics: both null, or one direction per known metric.

    A study of several objectives cannot be pruned (Optuna's trial.report and should_prune
    raise for it) nor sampled by CMA-ES; both are refused here rather than in trial 0."""
    study_cfg = cfg.study
    directions, metrics = study_cfg.get("directions"), study_cfg.get("metrics")
    if directions is None and metrics is None:
        check_metric(str(study_cfg.metric), str(cfg.data.metric))
        return
    if directions is None or metrics is None:
        given, missing = (
            ("metrics", "directions") if directions is None else ("directions", "metrics")
        )
        raise ConfigError(
            f"study.{given} is set but study.{missing} is null: a multi-objective study "
            "needs both, one entry per objective"
        )
    if len(directions) != len(metrics):
        raise ConfigError(
            f"study.directions has {len(directions)} entries and study.metrics "
            f"{len(metrics)}: give one direction per metric"
        )
    n = len(directions)
    if n < 2:
        raise ConfigError(
            "study.directions has 1 entry: one objective is study.direction and "
            "study.metric (leave study.directions and study.metrics null)"
        )
    known = objective_metrics(str(cfg.data.metric))
    for i, metric in enumerate(metrics):
        if metric not in known:
            raise ConfigError(
                f"study.metrics[{i}]={metric!r} is not a metric the objective measures "
                f"here: one of {', '.join(known)}"
            )
        if list(metrics).count(metric) > 1:
            raise ConfigError(f"study.metrics lists {metric} twice")
    pruner = str(study_cfg.pruner.type)
    if pruner != "none":
        raise ConfigError(
            f"study.pruner.type={pruner} cannot prune a multi-objective study "
            f"(study.directions has {n} entries): set study.pruner.type=none"
        )
    if str(study_cfg.sampler.type) == "cmaes":
        raise ConfigError(
            f"study.sampler.type=cmaes cannot sample a multi-objective study "
            f"(study.directions has {n} entries): use tpe, gp, random or grid"
        )


def check_metric(metric: str, data_metric: str) -> None:
    """One objective: the metric is reported every epoch and pruned on, so it must be one
    the engine measures on validation for this data (the costs come only at a trial's end)."""
    known = validation_metrics(data_metric)
    if metric not in known:
        need = " (val/bacc needs data.metric=bacc)" if metric == "val/bacc" else ""
        raise ConfigError(
            f"study.metric={metric!r} is not a validation metric the objective measures "
            f"here: one of {', '.join(known)}{need}"
        )


def check_data(data_cfg: DictConfig) -> None:
    if data_cfg.name == "synthetic" and int(data_cfg.n_train) < int(data_cfg.num_classes):
        raise ConfigError(
            f"data.n_train={data_cfg.n_train} is below data.num_classes="
            f"{data_cfg.num_classes}: every class needs an image"
        )


def check_lr_finder(fcfg: DictConfig) -> None:
    if float(fcfg.end_lr) <= float(fcfg.start_lr):
        raise ConfigError(
            f"lr_finder.end_lr={fcfg.end_lr} must be above lr_finder.start_lr={fcfg.start_lr}"
        )


def check_machine(cfg: DictConfig) -> None:
    """What depends on this machine: the device, bf16 support, optional packages."""
    device = pick_device(str(cfg.trainer.device))
    use_bf16(str(cfg.trainer.precision), device)
    cmaes = cfg.search_space and str(cfg.study.sampler.type) == "cmaes"
    if cmaes and importlib.util.find_spec("cmaes") is None:
        raise ConfigError("study.sampler.type=cmaes needs the cmaes package (pip install cmaes)")
