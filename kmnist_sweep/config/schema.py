"""Every key of conf/: its one type, range and unit. `config/check.py` checks a composed
config against this table, once, before any work starts.

The YAML files say what a key is set to; this file says what it may be. A key in conf/
without a row here fails the schema test (tests/config/test_config.py), and so does a row whose
key no conf/ file sets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig

from kmnist_sweep.config.values import allowed, check_choice, check_number, duration_s
from kmnist_sweep.errors import ConfigError


@dataclass(frozen=True)
class Key:
    """What one config key may hold; `check` returns the value or raises a ConfigError."""

    kind: str  # int | float | pow2 | choice | bool | text | mapping | custom
    unit: str  # what the number counts, or what the text names
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    nullable: bool = False
    choices: tuple[str, ...] = ()
    custom: Callable[[str, Any], Any] | None = None
    accepts: str = ""  # custom: what it accepts, in words

    def check(self, key: str, value: Any) -> Any:
        if value is None and self.nullable:
            return None
        if self.kind in ("int", "float", "pow2"):
            number = check_number(
                key,
                value,
                whole=self.kind != "float",
                low=self.low,
                high=self.high,
                low_open=self.low_open,
                high_open=self.high_open,
            )
            if self.kind == "pow2" and number & (number - 1):
                raise ConfigError(f"{key}={value!r} is not a power of two")
            return number
        if self.kind == "choice":
            return check_choice(key, value, self.choices)
        if self.kind == "bool" and isinstance(value, bool):
            return value
        if self.kind == "text" and isinstance(value, str):
            return value
        if self.kind == "mapping" and isinstance(value, dict | DictConfig):
            return value
        if self.kind == "custom" and self.custom is not None:
            return self.custom(key, value)
        raise ConfigError(f"{key}={value!r} is not {self.describe()}")

    def describe(self) -> str:
        """What the key accepts, in words (the schema table of docs/configuration.md)."""
        if self.kind in ("int", "float", "pow2"):
            text = allowed(
                self.kind != "float", self.low, self.high, self.low_open, self.high_open
            )
            text = (
                text.replace("a whole number", "a power of two") if self.kind == "pow2" else text
            )
        elif self.kind == "choice":
            text = "one of " + ", ".join(self.choices)
        else:
            text = {
                "bool": "true or false",
                "text": "a string",
                "mapping": "a mapping",
                "custom": self.accepts,
            }[self.kind]
        return text + (" or null" if self.nullable and self.kind != "custom" else "")


def _int(unit: str, low: float | None = None, high: float | None = None, **kw: Any) -> Key:
    return Key("int", unit, low=low, high=high, **kw)


def _float(unit: str, low: float | None = None, high: float | None = None, **kw: Any) -> Key:
    return Key("float", unit, low=low, high=high, **kw)


def _choice(unit: str, *choices: str, **kw: Any) -> Key:
    return Key("choice", unit, choices=choices, **kw)


def _text(unit: str, **kw: Any) -> Key:
    return Key("text", unit, **kw)


def _bool(unit: str) -> Key:
    return Key("bool", unit)


def _auto_or_count(key: str, value: Any) -> Any:
    if str(value) == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}={value!r} must be auto or an integer")
    if value < 1:
        raise ConfigError(f"{key}={value} must be >= 1")
    return value


def _view_count(key: str, value: Any) -> int:
    if type(value) is not int or value not in TEST_VIEW_COUNTS:  # not 5.0, not true
        raise ConfigError(f"{key}={value!r} must be 1, 5 or 9")
    return int(value)


def _text_list(*choices: str) -> Callable[[str, Any], Any]:
    """null, or a list of strings (each one of `choices` when given): one per objective."""

    def check(key: str, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, list | tuple | ListConfig) or not value:
            raise ConfigError(f"{key}={value!r} is not a list or null")
        for i, item in enumerate(value):
            if choices:
                check_choice(f"{key}[{i}]", item, choices)
            elif not isinstance(item, str):
                raise ConfigError(f"{key}[{i}]={item!r} is not a string")
        return list(value)

    return check


def _rungs(key: str, value: Any) -> Any:
    """null, or epochs of each rung: whole numbers in 1-30, each above the one before."""
    if value is None:
        return None
    if not isinstance(value, list | tuple | ListConfig) or not value:
        raise ConfigError(f"{key}={value!r} is not a list of epochs or null")
    rungs = [
        check_number(f"{key}[{i}]", v, whole=True, low=1, high=30) for i, v in enumerate(value)
    ]
    if any(b <= a for a, b in zip(rungs, rungs[1:], strict=False)):
        raise ConfigError(f"{key}={list(value)} must rise from rung to rung, e.g. [3, 10]")
    return rungs


FRACTION = {"low": 0, "high": 1, "high_open": True}  # [0, 1)
SHARE = {"low": 0, "low_open": True, "high": 1, "high_open": True}  # (0, 1)
ARCHS = ("resnet18", "resnet34", "resnet50")
STEMS = ("imagenet", "small")
DATASETS = ("kmnist", "k49", "kkanji", "kmnist_sample", "synthetic")
SAMPLERS = ("tpe", "random", "grid", "cmaes", "gp")
PRUNERS = ("none", "median", "percentile", "halving", "hyperband")
STEP_PRUNERS = ("median", "percentile")  # judge a trial against others at a step they share
TEST_VIEW_COUNTS = (1, 5, 9)  # train/views.py: the image; + its 4 neighbours; + 4 diagonals

SCHEMA: dict[str, Key] = {
    "seed": _int("RNG seed of weights, batch order, augmentation and splits", 0),
    # data: (one group; each dataset uses the keys its conf/data/*.yaml sets)
    "data.name": _choice("dataset", *DATASETS),
    "data.root": _text("folder of the files (relative: to the working folder)", nullable=True),
    "data.format": _choice("KMNIST file format", "idx", "npz"),
    "data.download": _bool("fetch missing files"),
    "data.mirror": _text("folder URL serving the files", nullable=True),
    "data.verify": _bool("check official sizes, md5s and counts"),
    # Above 0: sweeps rank and prune on validation, and `final` measures the test split.
    "data.valid_fraction": _float("fraction of each class held out for validation", **SHARE),
    "data.test_fraction": _float("fraction of each class held out for test", **SHARE),
    "data.split_seed": _int("RNG seed of the test split", 0),
    "data.seed": _int("RNG seed of the validation split", 0),
    "data.metric": _choice("metric", "acc", "bacc"),
    "data.num_classes": _int("classes", 2),
    "data.n_train": _int("images (train + valid)", 1),
    "data.n_test": _int("images", 1),
    "data.image_size": _int("pixels per side", 7),
    # model:
    "model.arch": _choice("ResNet depth", *ARCHS),
    "model.stem": _choice("stem", *STEMS),
    "model.pretrained": _bool("ImageNet weights"),
    # trainer:
    "trainer.epochs": _int("epochs", 0, 30),
    "trainer.batch_size": Key("pow2", "images per optimiser step", low=1),
    "trainer.lr": _float("peak one-cycle learning rate per step", 0, low_open=True),
    "trainer.optimizer": _choice("optimizer", "adamw", "sgd"),
    "trainer.momentum": _float("AdamW beta1 / SGD momentum", 0, 1, high_open=True),
    "trainer.weight_decay": _float("AdamW decoupled decay / SGD L2 coefficient", 0),
    "trainer.label_smoothing": _float("probability mass on the other classes", **FRACTION),
    "trainer.pct_start": _float("fraction of steps warming up", **FRACTION),
    "trainer.translate": _int("pixels of random shift per axis", 0),
    "trainer.cutout": _int("pixels per side of the zeroed square", 0),
    "trainer.ema": _float("fraction of the weight average kept per step", **FRACTION),
    "trainer.precision": _choice("arithmetic", "auto", "bf16", "fp32"),
    "trainer.channels_last": Key(
        "custom",
        "memory layout",
        custom=lambda k, v: _auto_bool(k, v),
        accepts="auto, true or false",
    ),
    "trainer.device": _text("auto | cpu | cuda | cuda:N"),
    "trainer.eval_batch_size": Key(
        "custom",
        "images per evaluation step",
        custom=_auto_or_count,
        accepts="auto or an integer >= 1",
    ),
    "trainer.test_views": Key(
        "custom",
        "views averaged per test image",
        custom=_view_count,
        accepts="1, 5 or 9",
    ),
    "trainer.noise_scale_every": _int("optimiser steps between noise-scale measurements", 0),
    "trainer.threads": _int("CPU threads (0: torch's default)", 0),
    # lr_finder:
    "lr_finder.start_lr": _float("learning rate at the first step", 0, low_open=True),
    "lr_finder.end_lr": _float("learning rate at the last step", 0, low_open=True),
    "lr_finder.num_it": _int("steps of the range test", 10),
    "lr_finder.beta": _float("EWMA factor smoothing the loss", **FRACTION),
    "lr_finder.suggestion": _choice("rule", "auto", "minimum", "bottom", "valley"),
    "lr_finder.scale": _choice(
        "rule carrying the LR to other batch sizes", "sqrt", "linear", "rerun"
    ),
    "lr_finder.batch_size": Key("pow2", "images per step of the reference range test", low=1),
    # batch_size:
    "batch_size.min": _int("images per step, smallest", 1),
    "batch_size.max": _int("images per step, largest", 1),
    "batch_size.diverge_factor": _float("multiple of the starting loss", 1, low_open=True),
    "batch_size.min_steps": _int("optimiser steps per trial, fewest (0: off)", 0),
    "batch_size.max_epochs": _int("epochs a trial is raised to, most", 1),
    "batch_size.target": _float("validation metric value", nullable=True),
    # study:
    "study.name": _text("study name in the storage"),
    "study.direction": _choice("direction", "maximize", "minimize"),
    "study.metric": _text("metric key, e.g. val/acc"),
    "study.directions": Key(
        "custom",
        "direction per objective",
        custom=_text_list("maximize", "minimize"),
        accepts="null or a list of maximize | minimize",
    ),
    "study.metrics": Key(
        "custom",
        "metric key per objective, e.g. [val/acc, speed/train_s]",
        custom=_text_list(),
        accepts="null or a list of metric keys",
    ),
    "study.n_trials": _int("finished trials in total", 1),
    "study.timeout": _float("seconds", 0, nullable=True),
    "study.budget": Key(
        "custom",
        "wall-clock time of search and final fit",
        custom=lambda k, v: duration_s(k, v),
        accepts="a duration (90s, 15m, 2h, 1h30m), seconds, or null",
    ),
    "study.budget_rungs": Key(
        "custom",
        "epochs of each successive-halving rung",
        custom=_rungs,
        accepts="null or a rising list of whole numbers in 1-30",
    ),
    "study.budget_keep": _int("1 in this many trials of a rung goes on to the next", 2),
    "study.storage": _text("storage URL"),
    "study.sampler.type": _choice("sampler", *SAMPLERS),
    "study.sampler.seed": _int("RNG seed (worker i: seed + i)", 0, nullable=True),
    "study.sampler.n_startup_trials": _int("random trials first", 0),
    "study.start_from_defaults": _bool("queue the config's own values as trial 0"),
    "study.pruner.type": _choice("pruner", *PRUNERS),
    "study.pruner.n_startup_trials": _int("finished trials before pruning", 0),
    "study.pruner.n_warmup_steps": _int("epochs before a trial may be pruned", 0),
    "study.pruner.n_min_trials": _int("finished trials a step's median needs", 1),
    "study.pruner.percentile": _float(
        "percent of finished trials' values a trial must stay in", 0, 100
    ),
    "study.pruner.min_resource": _int("epochs every trial gets", 1),
    "study.pruner.max_resource": _int("epochs of a trial never stopped", 0),
    "study.pruner.reduction_factor": _int("1 in this many trials go on at each rung", 2),
    "study.workers": Key(
        "custom", "processes", custom=_auto_or_count, accepts="auto or an integer >= 1"
    ),
    "study.workers_per_gpu": _int("processes per GPU", 1),
    "study.heartbeat_interval": _int("seconds", 1, nullable=True),
    "study.grace_period": _int("seconds", 1, nullable=True),
    "study.max_retry": _int("retries of a dead worker's trial", 0, nullable=True),
    "study.max_failed": _int("failing trials before the run stops", 1, nullable=True),
    "study.storage_patience": _float("seconds", 0),
    "study.poll_interval": _float("seconds", 0, low_open=True),
    "study.output_dir": _text("folder of the study's outputs"),
    "study.report": _bool("write the HTML report after the sweep"),
    # tracking:
    "tracking.mode": _choice("wandb mode", "online", "offline", "disabled"),
    "tracking.project": _text("wandb project"),
    "tracking.entity": _text("wandb team or user", nullable=True),
    "tracking.dir": _text("folder of offline runs"),
    "tracking.init_timeout": _float("seconds", 0, low_open=True),
    # launcher:
    "launcher.name": _choice("launcher", "local", "slurm"),
    "launcher.max_worker_restarts": _int("worker processes", 0),
    "launcher.jobs": _int("worker jobs", 1),
    "launcher.gpus_per_job": _int("GPUs per job", 0),
    "launcher.cpus_per_task": _int("CPU cores per job", 1, nullable=True),
    "launcher.mem_gb": _float("GB of host memory per job", 0, low_open=True, nullable=True),
    "launcher.timeout_min": _int("minutes per job", 1),
    "launcher.partition": _text("SLURM partition", nullable=True),
    "launcher.account": _text("SLURM account", nullable=True),
    "launcher.qos": _text("SLURM quality of service", nullable=True),
    "launcher.constraint": _text("SLURM node features", nullable=True),
    "launcher.additional_parameters": Key("mapping", "other sbatch options"),
    "launcher.job_name": _text("job name"),
    "launcher.folder": _text("folder of job scripts and logs"),
    # debug: for tests and diagnosis, not for sweeps.
    "debug.inject_oom": Key(
        "custom",
        "{above: images, epoch, step}",
        custom=lambda k, v: _oom_injection(k, v),
        accepts="null or {above: whole number >= 0, epoch, step: whole number >= 1 or null}",
    ),
    "debug.executor": _choice("submitit cluster", "slurm", "local"),
    "debug.objective": _text("module:function building the objective"),
}

# Sections whose keys a plug-in objective may add (e.g. the test suite's `toy:`) are not
# ours to check; these are, key by key.
SECTIONS = (
    "data",
    "model",
    "trainer",
    "lr_finder",
    "batch_size",
    "study",
    "tracking",
    "launcher",
    "debug",
)
FREE_FORM = ("search_space", "hydra")  # checked by config/search_space.py, or Hydra's own


def _auto_bool(key: str, value: Any) -> Any:
    if value == "auto" or isinstance(value, bool):
        return value
    raise ConfigError(f"{key}={value!r} is not auto, true or false")


OOM_PARTS = ("above", "epoch", "step")


def _oom_injection(key: str, value: Any) -> Any:
    """null, or where to fake running out of memory: batches above `above` images, at a
    1-based epoch and step (either null: a random one)."""
    if value is None:
        return None
    if not isinstance(value, dict | DictConfig):
        raise ConfigError(f"{key}={value!r} is not a mapping {{above: images, epoch, step}}")
    for part in map(str, value):
        if part not in OOM_PARTS:
            raise ConfigError(f"{key}.{part}: no such key (one of {', '.join(OOM_PARTS)})")
    if value.get("above") is None:
        raise ConfigError(f"{key} needs above: the batch size (images) above which it fires")
    check_number(f"{key}.above", value["above"], whole=True, low=0)
    for part in OOM_PARTS[1:]:
        check_number(f"{key}.{part}", value.get(part), whole=True, low=1, nullable=True)
    return value
