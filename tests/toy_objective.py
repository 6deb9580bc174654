"""A cheap stand-in for kmnist_sweep.sweep.objective: same shape, no data, no training.

Point a study at it with `debug.objective=tests.toy_objective:make_toy_objective`. A `toy:`
section in the config tunes it (all optional):

    toy:
      epochs: 4              # epochs reported per trial
      sleep: 0.01            # seconds per epoch, so trials of several workers overlap
      kill_trial: null       # trial number whose worker SIGKILLs itself after epoch 1
      interrupt_trial: null  # trial number that raises KeyboardInterrupt (a Ctrl-C)
      start_together: 0      # trials 0..N-1 wait (<= 60 s) until N trials run: N workers got one
      raise_trials: []       # trial numbers that raise RuntimeError at epoch 1 ("all": every one)
      start_at: null         # epoch time (time.time()) the factory waits for: launchers
                             # started together open a new storage at the same instant
      record_device: false   # set user attrs `device` (trainer.device as the worker got it)
                             # and `cuda_visible_devices` (its CUDA_VISIBLE_DEVICES)

With study.metrics set (a multi-objective study) it reports nothing per epoch, as the real
objective, and returns the score for each val/ metric and a cost (larger for later positions
in the ranges, so it trades off against the score) for any other.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import optuna
from omegaconf import DictConfig

import kmnist_sweep  # noqa: F401  (package first, as everywhere)
from kmnist_sweep.config.search_space import (
    Param,
    apply_params,
    optuna_name,
    parse_space,
    pow2_exponents,
    to_overrides,
)


def suggest(
    trial: optuna.Trial, params: list[Param], base_lr: float
) -> tuple[dict[str, Any], list[float]]:
    """Config values, and each value's position in its range (0..1)."""
    values: dict[str, Any] = {}
    positions = []
    for p in params:
        if p.type == "lr_finder" and not p.searched:
            values[p.name] = base_lr  # the toy's "finder" suggests the configured LR
            continue
        if p.type == "float" or p.type == "lr_finder":
            low, high = (p.low, p.high) if p.type == "float" else (p.low_factor, p.high_factor)
            log = p.log or p.type == "lr_finder"
            v = trial.suggest_float(optuna_name(p), low, high, log=log)
            span = (math.log(high) - math.log(low)) if log else (high - low)
            pos = ((math.log(v) - math.log(low)) if log else (v - low)) / (span or 1.0)
            if p.type == "lr_finder":
                v *= base_lr  # the toy's "finder" always suggests the configured LR
        elif p.type == "int":
            v = trial.suggest_int(optuna_name(p), int(p.low), int(p.high), log=p.log)
            pos = (v - p.low) / ((p.high - p.low) or 1)
        elif p.type == "pow2":
            lo, hi = pow2_exponents(p)
            e = trial.suggest_int(optuna_name(p), lo, hi)
            v, pos = 2**e, (e - lo) / ((hi - lo) or 1)
        else:
            v = trial.suggest_categorical(optuna_name(p), list(p.choices))
            pos = p.choices.index(v) / ((len(p.choices) - 1) or 1)
        values[p.name] = v
        positions.append(pos)
    return values, positions


def wait_until_running(study: optuna.Study, count: int, timeout: float = 60.0) -> None:
    """Until `count` trials run at once: as a worker runs one at a time, each has one."""
    end = time.time() + timeout
    running = (optuna.trial.TrialState.RUNNING,)
    while time.time() < end and len(study.get_trials(deepcopy=False, states=running)) < count:
        time.sleep(0.05)


def make_toy_objective(cfg: DictConfig) -> Callable[[optuna.Trial], float | tuple[float, ...]]:
    params = parse_space(cfg.search_space, cfg)
    toy = cfg.get("toy") or {}
    epochs = int(toy.get("epochs", 4))
    sleep = float(toy.get("sleep", 0.01))
    kill_trial = toy.get("kill_trial")
    interrupt_trial = toy.get("interrupt_trial")
    together = int(toy.get("start_together", 0))
    raise_trials = toy.get("raise_trials") or []
    record_device = bool(toy.get("record_device", False))
    start_at = toy.get("start_at")
    if start_at is not None:  # the runner builds the objective before it opens the storage
        time.sleep(max(0.0, float(start_at) - time.time()))
    metric = str(cfg.study.metric)
    metrics = list(cfg.study.get("metrics") or [])

    def objective(trial: optuna.Trial) -> float | tuple[float, ...]:
        values, positions = suggest(trial, params, float(cfg.trainer.lr))
        apply_params(cfg, values)  # as the real objective does; raises on a bad key
        trial.set_user_attr("overrides", to_overrides(values))
        if record_device:
            trial.set_user_attr("device", str(cfg.trainer.device))
            trial.set_user_attr("cuda_visible_devices", os.environ.get("CUDA_VISIBLE_DEVICES"))
        # Best near 30% of every range; the score rises with epochs like a training curve.
        quality = math.exp(-8.0 * sum((u - 0.3) ** 2 for u in positions) / max(len(positions), 1))
        score = 0.0
        if trial.number < together:
            wait_until_running(trial.study, together)
        for epoch in range(1, epochs + 1):
            time.sleep(sleep)
            score = 0.1 + 0.85 * quality * (1.0 - math.exp(-epoch / 2.0))
            if not metrics:  # Optuna cannot report or prune a trial of several values
                trial.report(score, step=epoch)
            if trial.number == kill_trial:
                os.kill(os.getpid(), signal.SIGKILL)
            if trial.number == interrupt_trial:
                raise KeyboardInterrupt
            if raise_trials == "all" or trial.number in raise_trials:
                raise RuntimeError(f"toy failure in trial {trial.number}")
            if not metrics and trial.should_prune():
                raise optuna.TrialPruned(f"{metric}={score:.4f} at epoch {epoch}")
        trial.set_user_attr("val", {metric: score})
        if metrics:
            cost = round(epochs * (1.0 + sum(positions)), 4)
            return tuple(score if m.startswith("val/") else cost for m in metrics)
        return score

    return objective
