"""The `search_space:` mapping: parse and validate it, apply chosen values to a config.

A space is data that mirrors Optuna's suggest calls, keyed by dotted config paths:

    trainer.batch_size: {type: pow2, low: 32, high: 2048}            # images per step
    trainer.lr: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}  # peak LR per step
    trainer.lr: {type: lr_finder, low_factor: 0.1, high_factor: 10}  # x the finder's LR

This module never calls `trial.suggest_*` (only `objective` touches a Trial); it turns
the mapping into `Param`s, checks them against the composed config, and writes values
back into a copy of the config or into Hydra override strings.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kmnist_sweep.config.keys import did_you_mean, leaf_keys
from kmnist_sweep.errors import ConfigError

ParamType = Literal["float", "int", "pow2", "categorical", "lr_finder"]
TYPES: tuple[str, ...] = ("float", "int", "pow2", "categorical", "lr_finder")

# Fields each type accepts ("type" included); anything else is a typo worth reporting.
FIELDS: dict[str, tuple[str, ...]] = {
    "float": ("type", "low", "high", "log", "step"),
    "int": ("type", "low", "high", "log", "step"),
    "pow2": ("type", "low", "high"),
    "categorical": ("type", "choices"),
    "lr_finder": ("type", "low_factor", "high_factor"),
}
REQUIRED: dict[str, tuple[str, ...]] = {
    "float": ("low", "high"),
    "int": ("low", "high"),
    "pow2": ("low", "high"),
    "categorical": ("choices",),
    "lr_finder": (),  # without factors: exactly the finder's LR, seeded and not searched
}
# Keys whose range the rest of the project relies on.
EPOCHS_KEY = "trainer.epochs"
EPOCHS_RANGE = (0, 30)  # epochs
BATCH_SIZE_KEY = "trainer.batch_size"


@dataclass(frozen=True)
class Param:
    """One searched config key; fields mirror the matching `trial.suggest_*` call."""

    name: str  # dotted config key, e.g. "trainer.lr"
    type: ParamType
    low: float = 0.0  # float/int/pow2: inclusive lower bound (an int for int and pow2)
    high: float = 0.0  # float/int/pow2: inclusive upper bound (an int for int and pow2)
    log: bool = False  # float/int: sample uniformly in log space
    step: float | None = None  # float/int: grid step (None: continuous float, 1 for int)
    choices: tuple[Any, ...] = ()  # categorical: the values
    low_factor: float = 0.0  # lr_finder: lowest multiple of the finder's LR (< 1; 1 = seeded)
    high_factor: float = 0.0  # lr_finder: highest multiple of the finder's LR (> 1; 1 = seeded)

    @property
    def searched(self) -> bool:
        """False for an lr_finder key without factors: set from the finder, not sampled."""
        return not (self.type == "lr_finder" and self.low_factor == self.high_factor == 1.0)


def parse_space(
    space: Mapping[str, Any] | DictConfig, cfg: DictConfig | None = None
) -> list[Param]:
    """Validate a `search_space:` mapping and return its parameters in file order.

    With `cfg` (the composed config), every key must name an existing leaf of it.
    Raises ConfigError with a one-line message naming the offending key.
    """
    if isinstance(space, DictConfig):
        space = cast(dict[str, Any], OmegaConf.to_container(space, resolve=True))
    if not isinstance(space, Mapping):
        raise ConfigError(f"search_space must be a mapping of config keys, got {space!r}")
    params = []
    for name, spec in _flatten(space):
        param = _parse_param(name, spec)
        if cfg is not None:
            _check_key_exists(param.name, cfg)
        params.append(param)
    return params


def space_difference(
    old: Mapping[str, Any] | DictConfig, new: Mapping[str, Any] | DictConfig
) -> str | None:
    """None when two search spaces search the same keys with the same types, bounds, steps
    and choices (however they are written: dotted or nested keys, 1e-3 or 0.001, key order,
    defaults spelled out or not); else the first difference, e.g.
    "trainer.lr: float 0.0001..0.1 log there, float 0.001..0.1 log here"."""
    try:
        before = {p.name: p for p in parse_space(old)}
    except ConfigError:
        return "the stored search space is not one this version reads"
    after = {p.name: p for p in parse_space(new)}
    for name in list(before) + [n for n in after if n not in before]:
        there, here = before.get(name), after.get(name)
        if there != here:
            return (
                f"{name}: {describe(there) if there else 'not searched'} there, "
                f"{describe(here) if here else 'not searched'} here"
            )
    return None


def describe(param: Param) -> str:
    """A param in a few words: "pow2 32..2048", "float 0.0001..0.1 log", "lr_finder x0.1..x10"."""
    if param.type == "categorical":
        return f"categorical {list(param.choices)}"
    if param.type == "lr_finder":
        if not param.searched:
            return "lr_finder (the finder's LR)"
        return f"lr_finder x{param.low_factor:g}..x{param.high_factor:g}"
    text = f"{param.type} {param.low:g}..{param.high:g}"
    if param.log:
        text += " log"
    if param.step is not None:
        text += f" step {param.step:g}"
    return text


def optuna_name(param: Param) -> str:
    """The name the objective suggests a param under: pow2 -> "<name>.log2" (the exponent),
    lr_finder -> "<name>.factor" (the multiple of the finder's LR), else the config key."""
    suffix = {"pow2": ".log2", "lr_finder": ".factor"}.get(param.type, "")
    return param.name + suffix


def pow2_exponents(param: Param) -> tuple[int, int]:
    """Integer exponents (lo, hi) of a pow2 param's bounds: 32..2048 -> (5, 11)."""
    if param.type != "pow2":
        raise ValueError(f"{param.name} is not a pow2 parameter")
    return int(param.low).bit_length() - 1, int(param.high).bit_length() - 1


def apply_params(cfg: DictConfig, values: Mapping[str, Any]) -> DictConfig:
    """A copy of `cfg` with each dotted key in `values` set; `cfg` itself is untouched."""
    out = copy.deepcopy(cfg)
    for key, value in values.items():
        _check_key_exists(key, out)
        try:
            OmegaConf.update(out, key, value, merge=False)
        except OmegaConfBaseException as exc:
            first = str(exc).splitlines()[0]
            raise ConfigError(f"cannot set {key}={value!r}: {first}") from None
    return out


def to_overrides(values: Mapping[str, Any]) -> list[str]:
    """Hydra command-line overrides for `values`: {"trainer.lr": 0.003} -> ["trainer.lr=0.003"]."""
    return [f"{key}={format_override_value(value)}" for key, value in values.items()]


def format_override_value(value: Any) -> str:
    """A value as Hydra's override grammar reads it back unchanged."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, list | tuple | ListConfig):
        return "[" + ",".join(format_override_value(v) for v in value) + "]"
    if isinstance(value, Mapping | DictConfig):
        items = (f"{k}:{format_override_value(v)}" for k, v in value.items())
        return "{" + ",".join(items) + "}"
    text = str(value)
    if _PLAIN_STRING.fullmatch(text) and text.lower() not in _RESERVED_WORDS:
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


# Strings Hydra would read as something else (numbers, bools, null) or cannot parse bare.
_PLAIN_STRING = re.compile(r"[A-Za-z_][A-Za-z0-9_\-./]*")
_RESERVED_WORDS = {"true", "false", "null", "nan", "inf"}


def _flatten(space: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """(dotted key, spec) pairs in file order.

    Keys may be dotted (`trainer.lr: {...}`) or nested (`trainer: {lr: {...}}`); parts of one
    key merge, so `++search_space.trainer.lr.high=0.01` on the command line narrows a range,
    and `++search_space.trainer.lr=null` takes a key out of a sweep's space.
    """
    merged: dict[str, Any] = {}
    removed: set[str] = set()
    for name, spec in _walk(space, prefix=""):
        if spec is None:
            removed.add(name)
        elif isinstance(merged.get(name), Mapping) and isinstance(spec, Mapping):
            merged[name] = {**merged[name], **spec}
        else:
            merged[name] = spec
    return [(name, spec) for name, spec in merged.items() if name not in removed]


def _walk(space: Mapping[str, Any], prefix: str) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, spec in space.items():
        name = f"{prefix}{key}"
        nested = isinstance(spec, Mapping) and spec and "type" not in spec
        if nested and all(isinstance(v, Mapping) or v is None for v in spec.values()):
            out.extend(_walk(spec, prefix=f"{name}."))
        else:
            out.append((name, spec))
    return out


def _parse_param(name: str, spec: Any) -> Param:
    where = f"search_space.{name}"
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: expected a mapping like {{type: float, low: .., high: ..}}")
    kind = spec.get("type")
    if kind is None:
        raise ConfigError(f"{where}: missing 'type' (one of {', '.join(TYPES)})")
    if kind not in TYPES:
        raise ConfigError(
            f"{where}: unknown type {kind!r}{did_you_mean(str(kind), TYPES)}"
            f" (expected one of {', '.join(TYPES)})"
        )
    allowed = FIELDS[kind]
    for field in spec:
        if field not in allowed:
            raise ConfigError(
                f"{where}: unknown field {field!r}{did_you_mean(str(field), allowed)}"
                f" for type {kind} (allowed: {', '.join(allowed)})"
            )
    for field in REQUIRED[kind]:
        if spec.get(field) is None:
            raise ConfigError(f"{where}: type {kind} needs '{field}'")

    if kind == "categorical":
        param = _parse_categorical(name, where, spec)
    elif kind == "lr_finder":
        param = _parse_lr_finder(name, where, spec)
    else:
        param = _parse_range(name, where, kind, spec)
    _check_project_rules(param, where)
    return param


def _parse_range(name: str, where: str, kind: str, spec: Mapping[str, Any]) -> Param:
    integral = kind in ("int", "pow2")
    low = _number(where, "low", spec["low"], integral)
    high = _number(where, "high", spec["high"], integral)
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: 'log' must be true or false, got {log!r}")
    step = spec.get("step")
    if step is not None:
        step = _number(where, "step", step, kind == "int")
        if step <= 0:
            raise ConfigError(f"{where}: step must be > 0, got {step}")
    if low > high:
        raise ConfigError(f"{where}: low > high ({low} > {high})")
    if log and low <= 0:
        raise ConfigError(f"{where}: log scale needs low > 0, got low={low}")
    if log and step is not None and (kind == "float" or step != 1):
        raise ConfigError(f"{where}: 'log' and 'step' cannot be combined")
    if kind == "pow2":
        for field, bound in (("low", low), ("high", high)):
            if bound < 1 or int(bound) & (int(bound) - 1):
                raise ConfigError(
                    f"{where}: pow2 bounds must be powers of two, got {field}={bound}"
                )
    return Param(name, cast(ParamType, kind), low=low, high=high, log=log, step=step)


def _parse_categorical(name: str, where: str, spec: Mapping[str, Any]) -> Param:
    choices = spec["choices"]
    if not isinstance(choices, list | tuple) or not choices:
        raise ConfigError(f"{where}: categorical needs a non-empty list of choices")
    for choice in choices:
        if choice is not None and not isinstance(choice, bool | int | float | str):
            raise ConfigError(
                f"{where}: choices must be numbers, strings, booleans or null, got {choice!r}"
            )
    if len(set(map(repr, choices))) != len(choices):
        raise ConfigError(f"{where}: choices repeat a value: {list(choices)}")
    return Param(name, "categorical", choices=tuple(choices))


def _parse_lr_finder(name: str, where: str, spec: Mapping[str, Any]) -> Param:
    given = [f for f in ("low_factor", "high_factor") if spec.get(f) is not None]
    if not given:  # {type: lr_finder}: the finder's LR itself, for every trial
        return Param(name, "lr_finder", low_factor=1.0, high_factor=1.0)
    if len(given) == 1:
        missing = "high_factor" if given == ["low_factor"] else "low_factor"
        raise ConfigError(f"{where}: type lr_finder needs '{missing}' with '{given[0]}'")
    low = _number(where, "low_factor", spec["low_factor"], integral=False)
    high = _number(where, "high_factor", spec["high_factor"], integral=False)
    if not 0 < low < 1 < high:
        raise ConfigError(
            f"{where}: lr_finder needs 0 < low_factor < 1 < high_factor, got {low} and {high}"
        )
    return Param(name, "lr_finder", low_factor=low, high_factor=high)


def _check_project_rules(param: Param, where: str) -> None:
    if param.name == BATCH_SIZE_KEY and param.type != "pow2":
        raise ConfigError(f"{where}: batch size must be searched with type pow2, not {param.type}")
    if param.name == EPOCHS_KEY:
        lo, hi = EPOCHS_RANGE
        if param.type not in ("int", "categorical"):
            raise ConfigError(f"{where}: epochs must be type int or categorical")
        values = param.choices if param.type == "categorical" else (param.low, param.high)
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ConfigError(f"{where}: epochs must be integers in {lo}..{hi}, got {v!r}")


def _number(where: str, field: str, value: Any, integral: bool) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: '{field}' must be a number, got {value!r}")
    if integral:
        if float(value) != int(value):
            raise ConfigError(f"{where}: '{field}' must be an integer, got {value!r}")
        return int(value)
    if not math.isfinite(value):
        raise ConfigError(f"{where}: '{field}' must be finite, got {value!r}")
    return float(value)


_MISSING = object()
_NOT_SEARCHABLE = ("search_space", "study", "hydra")


def _check_key_exists(key: str, cfg: DictConfig) -> None:
    if key.split(".")[0] in _NOT_SEARCHABLE:
        raise ConfigError(f"search_space.{key}: {key.split('.')[0]}.* keys cannot be searched")
    if key == "trainer.test_views":
        raise ConfigError(
            f"search_space.{key}: cannot be searched (trials never see the test split)"
        )
    node = OmegaConf.select(cfg, key, default=_MISSING, throw_on_resolution_failure=False)
    if node is _MISSING:
        raise ConfigError(
            f"search_space.{key}: no such config key{did_you_mean(key, leaf_keys(cfg))}"
        )
    if isinstance(node, DictConfig | ListConfig):
        raise ConfigError(f"search_space.{key}: names a config section, not a single value")
