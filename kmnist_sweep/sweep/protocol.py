"""What the sweep needs from an objective, and how it finds one (`debug.objective`).

    factory = load_factory("kmnist_sweep.sweep.objective:make_objective")
    objective = as_sweep_objective(factory(cfg))

The runner and the workers know this protocol only; the real trainer
(`sweep/objective.py`) and the test suite's toy implement it. A factory may also return a
plain `trial -> float` function: it gets the no-op hooks of `FunctionObjective`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast, runtime_checkable

import optuna
from omegaconf import DictConfig
from optuna.trial import FrozenTrial

from kmnist_sweep.errors import ConfigError


@runtime_checkable
class SweepObjective(Protocol):
    def __call__(self, trial: optuna.Trial) -> float | Sequence[float]:
        """Train the trial's config, report every epoch, return the study's metric (one
        value per metric of a multi-objective study, which reports and prunes nothing)."""

    def check(self) -> None:
        """Check the objective's own input (e.g. load the data) before any storage is
        opened; raise a UserError. Not called where workers run elsewhere (SLURM)."""

    def prepare(self, study: optuna.Study) -> None:
        """Once per sweep, before any worker starts: e.g. run the LR finder, queue a
        first trial."""

    def constraint(self, trial: FrozenTrial) -> Sequence[float]:
        """Feasibility for constraint-aware samplers: every value <= 0 is feasible."""

    def finish(self, study: optuna.Study) -> None:
        """Once, after the sweep's outputs are written (also when it was stopped)."""


Factory = Callable[[DictConfig], Any]


class FunctionObjective:
    """A plain `trial -> float` (or one value per objective) function with the protocol's
    hooks doing nothing."""

    def __init__(self, function: Callable[[optuna.Trial], float | Sequence[float]]) -> None:
        self.function = function

    def __call__(self, trial: optuna.Trial) -> float | Sequence[float]:
        return self.function(trial)

    def check(self) -> None:
        return None

    def prepare(self, study: optuna.Study) -> None:
        return None

    def constraint(self, trial: FrozenTrial) -> Sequence[float]:
        return [0.0]

    def finish(self, study: optuna.Study) -> None:
        return None


def as_sweep_objective(made: Any) -> SweepObjective:
    if isinstance(made, SweepObjective):
        return made
    if callable(made):
        return FunctionObjective(made)
    raise ConfigError(f"debug.objective returned {type(made).__name__}, not an objective")


def load_factory(path: str) -> Factory:
    """`package.module:function` -> the function (debug.objective in the config)."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"debug.objective={path!r} must look like package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"debug.objective={path!r}: cannot import {module_name}: {exc}"
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"debug.objective={path!r}: {module_name} has no function {attr}")
    return cast(Factory, factory)


def factory_path(factory: Factory) -> str | None:
    """The `module:function` that worker processes import to get `factory`; None for one
    they could not import (a closure, a lambda)."""
    path = f"{factory.__module__}:{factory.__qualname__}"
    try:
        return path if load_factory(path) is factory else None
    except ConfigError:
        return None
