"""The Optuna objective: suggest -> train -> report every epoch -> prune -> return the metric.

This is the only module that touches `optuna.Trial`. Around the engine it adds the two
ideas of the article: the LR is seeded from the LR finder, and a batch that runs out of
memory or diverges is halved and the run restarted (`batch_size.fit_with_fallback`).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from omegaconf import DictConfig, OmegaConf

from kmnist_sweep import batch_size, engine, lr_finder
from kmnist_sweep.data import Dataset, load_dataset
from kmnist_sweep.search_space import (
    Param,
    apply_params,
    parse_space,
    pow2_exponents,
    to_overrides,
)
from kmnist_sweep.tracking import Tracker

log = logging.getLogger(__name__)


def suggest_params(trial: optuna.Trial, params: list[Param]) -> dict[str, Any]:
    """One value per parameter, through the suggest call its type names.

    An `lr_finder` parameter is suggested as a factor (`<name>.factor`) on the finder's LR:
    the factor carries over between batch sizes, the raw LR does not.
    """
    values: dict[str, Any] = {}
    for p in params:
        if p.type == "float":
            values[p.name] = trial.suggest_float(p.name, p.low, p.high, log=p.log, step=p.step)
        elif p.type == "int":
            step = 1 if p.step is None else int(p.step)
            values[p.name] = trial.suggest_int(
                p.name, int(p.low), int(p.high), step=step, log=p.log
            )
        elif p.type == "pow2":
            # The exponent, not the size, is what the sampler sees: 64 is as far from 128 as
            # 1024 is from 2048, and a TPE or GP model should know that.
            lo, hi = pow2_exponents(p)
            values[p.name] = 2 ** trial.suggest_int(f"{p.name}.log2", lo, hi)
        elif p.type == "categorical":
            values[p.name] = trial.suggest_categorical(p.name, list(p.choices))
        elif p.type == "lr_finder":
            values[f"{p.name}.factor"] = trial.suggest_float(
                f"{p.name}.factor", p.low_factor, p.high_factor, log=True
            )
        else:
            raise NotImplementedError(f"search space type {p.type!r} for {p.name}")
    return values


def check_inputs(cfg: DictConfig) -> list[Param]:
    """The search space and every trainer/model value this objective would use, checked
    (ConfigError); the parsed search space."""
    params = parse_space(cfg.search_space, cfg)
    engine.check_config(cfg, params)
    return params


_PRELOADED: dict[str, Dataset] = {}  # data config -> dataset, for the next make_objective


def preload_dataset(cfg: DictConfig, keep: bool = True) -> None:
    """Load, and so check, the data before a sweep opens its storage (DataError). With
    `keep`, the next make_objective in this process takes this dataset instead of loading
    it again; without, it is dropped (workers in other processes load their own)."""
    dataset = load_dataset(cfg.data)
    _PRELOADED.clear()
    if keep:
        _PRELOADED[_data_key(cfg.data)] = dataset


def _data_key(data_cfg: DictConfig) -> str:
    """The resolved data config and the working directory its relative root starts from."""
    resolved = OmegaConf.to_container(data_cfg, resolve=True)
    return json.dumps([resolved, os.getcwd()], sort_keys=True, default=str)


def make_objective(
    cfg: DictConfig, tracker: Tracker | None = None
) -> Callable[[optuna.Trial], float]:
    """Load the data once per worker; each call trains one trial's configuration.

    Without a `tracker`, one is made from cfg.tracking and closed when the worker exits
    (wandb writes a run's last records only then)."""
    params = check_inputs(cfg)
    if tracker is None:
        tracker = Tracker(cfg.tracking, str(cfg.study.name), Path(str(cfg.study.output_dir)))
        atexit.register(tracker.close)
    seeded = [p.name for p in params if p.type == "lr_finder"]
    dataset: Dataset = _PRELOADED.get(_data_key(cfg.data)) or load_dataset(cfg.data)
    _PRELOADED.clear()
    metric = str(cfg.study.metric)
    out_dir = Path(str(cfg.study.output_dir))

    def objective(trial: optuna.Trial) -> float:
        values = suggest_params(trial, params)
        factors = {name: values.pop(f"{name}.factor") for name in seeded}
        trial_cfg = apply_params(cfg, values)
        requested = batch_size.check_batch_size(
            trial_cfg.trainer.batch_size, cfg.batch_size, "trainer.batch_size"
        )
        trial.set_user_attr("overrides", to_overrides(values))
        if dataset.note:
            trial.set_user_attr("note", dataset.note)
        reported: set[int] = set()

        def report(epoch: int, metrics: dict[str, float]) -> None:
            if tracker is not None:
                tracker.log_epoch(epoch, metrics)
            if metric not in metrics:
                raise KeyError(f"study.metric={metric!r} is not one of {sorted(metrics)}")
            # After a halving the run restarts: the first attempt's reports for these
            # epochs stand (Optuna keeps the first value of a step anyway).
            if epoch not in reported:
                reported.add(epoch)
                trial.report(metrics[metric], step=epoch)
            if trial.should_prune():
                trial.set_user_attr("reason", f"pruned at epoch {epoch}")
                raise optuna.TrialPruned(f"{metric}={metrics[metric]:.4f} at epoch {epoch}")

        def attempt(bs: int) -> engine.TrainResult:
            run_cfg = apply_params(trial_cfg, {"trainer.batch_size": bs})
            for name, factor in factors.items():
                base, source = lr_finder.seeded_lr(trial.study, run_cfg, dataset, bs)
                run_cfg = apply_params(run_cfg, {name: base * factor})
                trial.set_user_attr("lr/finder", base)
                trial.set_user_attr("lr/source", source)
                trial.set_user_attr("lr/value", base * factor)
            return engine.train(
                run_cfg,
                dataset,
                report,
                test=True,
                quiet=True,
                cbs=batch_size.guards(cfg.batch_size),
            )

        def halved(h: batch_size.Halving) -> None:
            log.warning(
                "trial %d: %s at batch %d (%s), restarting at %d",
                trial.number,
                h.cause,
                h.from_bs,
                h.detail,
                h.to_bs,
            )

        state, reason = "failed", ""
        record = batch_size.Fallback(requested)
        if tracker is not None:
            tracker.start_trial(trial.number, _run_config(trial_cfg, trial))
        try:
            result, record = batch_size.fit_with_fallback(
                attempt, requested, int(cfg.batch_size.min), halved
            )
            state = "complete"
        except batch_size.BatchSizeExhausted as exc:
            # Pruned, not failed: samplers learn from pruned trials (and their constraint),
            # while a failed trial teaches them nothing.
            state, reason, record = "pruned", str(exc), exc.record
            trial.set_user_attr("reason", reason)
            raise optuna.TrialPruned(reason) from None
        except optuna.TrialPruned as exc:
            state, reason = "pruned", str(exc)
            raise
        except Exception as exc:
            lines = str(exc).strip().splitlines()
            reason = f"{type(exc).__name__}: {lines[-1] if lines else ''}"
            raise
        finally:
            record_attrs(trial, record)
            if tracker is not None:
                tracker.end_trial(state, reason, trial_summary(trial))
        # What retrains this trial: the seeded LR and the batch that actually fitted.
        final = {**values, "trainer.batch_size": record.effective}
        final.update({name: float(trial.user_attrs["lr/value"]) for name in factors})
        trial.set_user_attr("overrides", to_overrides(final))
        # Kept for the record, never returned: the sampler must not see the test set.
        trial.set_user_attr("test", result.test)
        trial.set_user_attr("val", result.valid)
        trial.set_user_attr("seconds", round(result.seconds, 2))
        try:
            save_predictions(result, out_dir / "trials" / str(trial.number))
        except OSError as exc:  # a full or read-only disk costs the report a figure, not the trial
            log.warning("trial %d: could not save test predictions: %s", trial.number, exc)
        return result.valid[metric]

    return objective


def record_attrs(trial: optuna.Trial, record: batch_size.Fallback) -> None:
    for key, value in record.as_attrs().items():
        trial.set_user_attr(key, value)


def trial_summary(trial: optuna.Trial) -> dict[str, Any]:
    return {"trial": trial.number, **trial.params, **trial.user_attrs}


def _run_config(trial_cfg: DictConfig, trial: optuna.Trial) -> dict[str, Any]:
    """What wandb shows for a trial: the resolved config and its params; the effective batch
    size and the seeded LR arrive in the run's summary once known."""
    resolved = OmegaConf.to_container(trial_cfg, resolve=True)
    assert isinstance(resolved, dict)
    resolved.pop("search_space", None)
    return {
        **resolved,
        "trial": trial.number,
        "params": dict(trial.params),
        "batch_size/requested": int(trial_cfg.trainer.batch_size),
    }


def save_predictions(result: engine.TrainResult, directory: Path) -> None:
    """Test-set predictions of the trial, for the report's confusion matrix."""
    learn = result.learner
    if learn is None:
        return
    with learn.no_bar():
        probs, targets = learn.get_preds(ds_idx=2)
    directory.mkdir(parents=True, exist_ok=True)
    preds = torch.as_tensor(probs).argmax(dim=-1).numpy().astype(np.int32)
    np.savez_compressed(directory / "test_preds.npz", preds=preds, labels=np.asarray(targets))
