"""The Optuna objective: suggest -> train -> report every epoch -> prune -> return the metric
(or, for a multi-objective study, the value of each of study.metrics, never pruned).

This is the only module that touches `optuna.Trial`. Around the engine it adds the two
ideas of the article: the LR is seeded from the LR finder, and a batch that runs out of
memory or diverges is halved and the run restarted (`batch_size.fit_with_fallback`).

    objective = make_objective(cfg)      # the sweep protocol: check, prepare, constraint,
    study.optimize(objective)            # __call__ per trial, finish (the report)
"""

from __future__ import annotations

import atexit
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from omegaconf import DictConfig, OmegaConf
from optuna.trial import FrozenTrial

from kmnist_sweep import trial_attrs
from kmnist_sweep.config.check import objectives
from kmnist_sweep.config.schema import STEP_PRUNERS
from kmnist_sweep.config.search_space import (
    EPOCHS_KEY,
    Param,
    apply_params,
    parse_space,
    pow2_exponents,
    to_overrides,
)
from kmnist_sweep.data.datasets import Dataset, load_dataset
from kmnist_sweep.errors import error_line
from kmnist_sweep.files import write_atomic
from kmnist_sweep.results import report
from kmnist_sweep.results.batchsize import answer_text, size_answer, table_text
from kmnist_sweep.results.report import VALID_PREDICTIONS
from kmnist_sweep.results.tracking import Tracker
from kmnist_sweep.sweep import budgeted, lr_seed, optuna_internals
from kmnist_sweep.sweep.study import report_steps
from kmnist_sweep.train import batch_size, engine
from kmnist_sweep.train.noise_scale import NOISE_SCALE_KEY
from kmnist_sweep.train.standard_error import standard_errors

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
        elif p.type == "lr_finder" and not p.searched:
            values[f"{p.name}.factor"] = 1.0  # the finder's LR itself: nothing to sample
        elif p.type == "lr_finder":
            values[f"{p.name}.factor"] = trial.suggest_float(
                f"{p.name}.factor", p.low_factor, p.high_factor, log=True
            )
        else:
            raise NotImplementedError(f"search space type {p.type!r} for {p.name}")
    return values


def make_objective(cfg: DictConfig, tracker: Tracker | None = None) -> TrainingObjective:
    """The real objective for `cfg` (the factory `debug.objective` names by default)."""
    return TrainingObjective(cfg, tracker)


class TrainingObjective:
    """Trains one trial's configuration per call; the data is loaded once per process.

    Without a `tracker`, one is made from cfg.tracking and closed when the process exits
    (wandb writes a run's last records only then)."""

    def __init__(self, cfg: DictConfig, tracker: Tracker | None = None) -> None:
        # The reference range test runs at the sweep's own batch size: pinned here, since
        # `${trainer.batch_size}` would otherwise follow each trial's searched size and rerun
        # the test at every size (at 2048, longer than the trial).
        self.cfg = apply_params(cfg, {"lr_finder.batch_size": int(cfg.lr_finder.batch_size)})
        self.params = parse_space(cfg.search_space, cfg)
        # A budgeted sweep's rungs set the epochs: a searched trainer.epochs is not sampled.
        self.rungs = budgeted.rungs_of(cfg) if budgeted.budget_s(cfg) is not None else None
        if self.rungs is not None:
            self.params = [p for p in self.params if p.name != EPOCHS_KEY]
        self.seeded = [p.name for p in self.params if p.type == "lr_finder"]
        self.metric = str(cfg.study.metric)
        # Several objectives: the trial returns one value per metric, in this order.
        self.metrics = [metric for metric, _ in objectives(cfg.study)]
        self.multi = len(self.metrics) > 1
        self.out_dir = Path(str(cfg.study.output_dir))
        self.tracker = tracker
        self._dataset: Dataset | None = None

    @property
    def dataset(self) -> Dataset:
        if self._dataset is None:
            self._dataset = load_dataset(self.cfg.data)
        return self._dataset

    # ---------------------------------------------------------------- the sweep protocol

    def check(self) -> None:
        """Load, and so check, the data before the sweep opens its storage (DataError)."""
        _ = self.dataset

    def prepare(self, study: optuna.Study) -> None:
        searched = [p.name for p in self.params if p.type == "lr_finder" and p.searched]
        lr_seed.prepare(study, self.cfg, self.seeded, lambda: self.dataset, searched)

    def constraint(self, trial: FrozenTrial) -> Sequence[float]:
        return batch_size.constraint(trial.user_attrs)

    def finish(self, study: optuna.Study) -> None:
        """The report, and for a batch-size study its answer on one line."""
        if self.cfg.study.report:
            log.info("report: %s", report.report_sweep(study, self.cfg))
        answer = size_answer(study, self.metric, self.cfg.batch_size.get("target"))
        if answer is not None:
            print(f"{table_text(answer)}\n{answer_text(answer)}", flush=True)

    # ---------------------------------------------------------------- one trial

    def rung_epochs(self, trial: optuna.Trial) -> int:
        """A budgeted trial's epochs: its rung's, as the planner queued it; a trial queued
        otherwise (the defaults' trial 0) runs the first rung and is marked so."""
        assert self.rungs is not None
        attrs = trial.user_attrs
        if trial_attrs.BUDGET_EPOCHS not in attrs:
            trial.set_user_attr(trial_attrs.BUDGET_RUNG, 0)
            trial.set_user_attr(trial_attrs.BUDGET_EPOCHS, self.rungs[0])
            return self.rungs[0]
        return int(attrs[trial_attrs.BUDGET_EPOCHS])

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        if self.tracker is None:
            self.tracker = Tracker(self.cfg.tracking, str(self.cfg.study.name))
            atexit.register(self.tracker.close)
        values = suggest_params(trial, self.params)
        factors = {name: values.pop(f"{name}.factor") for name in self.seeded}
        if self.rungs is not None:
            values[EPOCHS_KEY] = self.rung_epochs(trial)
        trial_cfg = apply_params(self.cfg, values)
        trial.set_user_attr(trial_attrs.OVERRIDES, to_overrides(values))
        if self.dataset.note:
            trial.set_user_attr(trial_attrs.NOTE, self.dataset.note)
        run = _TrialRun(self, trial, trial_cfg, factors)
        record = batch_size.Fallback(int(trial_cfg.trainer.batch_size))
        state, reason = "failed", ""
        self.tracker.start_trial(trial.number, _run_config(trial_cfg, trial))
        try:
            result = batch_size.fit_with_fallback(
                run.attempt, record, int(self.cfg.batch_size.min), run.halved
            )
            trial.set_user_attr(trial_attrs.VALID, result.valid)
            for key, value in performance(result).items():
                trial.set_user_attr(key, value)
            verdict = batch_size.learning_verdict(
                result.valid.get("val/acc", 0.0), self.dataset.valid.labels
            )
            if verdict is not None:
                log.warning("trial %d: %s", trial.number, verdict)
                trial.set_user_attr(trial_attrs.DID_NOT_LEARN, verdict)
            state = "complete"
        except batch_size.BatchSizeExhausted as exc:
            # Pruned, not failed: samplers learn from pruned trials (and their constraint),
            # while a failed trial teaches them nothing.
            state, reason = "pruned", str(exc)
            trial.set_user_attr(trial_attrs.REASON, reason)
            raise optuna.TrialPruned(reason) from None
        except optuna.TrialPruned as exc:
            state, reason = "pruned", str(exc)
            raise
        except Exception as exc:
            reason = error_line(exc, last=True)
            raise
        finally:
            # Every end state keeps what happened to its batch size (and its LR).
            for key, value in record.as_attrs().items():
                trial.set_user_attr(key, value)
            if run.noise_scale:
                trial.set_user_attr(trial_attrs.NOISE_SCALE, run.noise_scale)
            self.tracker.end_trial(state, reason, trial_summary(trial))
        # What retrains this trial: the seeded LR, the batch that actually fitted, its epochs.
        final = {**values, "trainer.batch_size": record.effective}
        if run.epochs != int(trial_cfg.trainer.epochs):
            final["trainer.epochs"] = run.epochs
        final.update({name: float(trial.user_attrs[trial_attrs.LR_VALUE]) for name in factors})
        trial.set_user_attr(trial_attrs.OVERRIDES, to_overrides(final))
        predictions = valid_predictions(result)
        if predictions is not None:
            preds, labels, losses = predictions
            errors = standard_errors(preds, labels, losses, self.dataset.num_classes)
            trial.set_user_attr(
                trial_attrs.VALID_SE, {f"{k}_se": round(v, 6) for k, v in errors.items()}
            )
        try:
            save_predictions(predictions, self.out_dir / "trials" / str(trial.number))
        except OSError as exc:  # a full or read-only disk costs the report a figure, not the trial
            log.warning("trial %d: could not save predictions: %s", trial.number, exc)
        if self.multi:
            measured = {**result.valid, **performance(result)}
            return tuple(float(measured[metric]) for metric in self.metrics)
        return result.valid[self.metric]


def performance(result: engine.TrainResult) -> dict[str, Any]:
    """What the trial cost, as trial attributes: speed, time and memory of the run that counted."""
    return {
        trial_attrs.SECONDS: round(result.seconds, 2),
        trial_attrs.TRAIN_SECONDS: round(result.train_seconds, 3),
        trial_attrs.IMAGES_PER_S: round(result.images_per_s, 1),
        trial_attrs.SECONDS_PER_EPOCH: round(result.seconds_per_epoch, 3),
        trial_attrs.PEAK_MEMORY_MB: round(result.peak_memory / 2**20, 1),
    }


class _TrialRun:
    """One trial's attempts: each at a batch size, restarted from scratch after a halving."""

    def __init__(
        self,
        objective: TrainingObjective,
        trial: optuna.Trial,
        trial_cfg: DictConfig,
        factors: dict[str, float],
    ) -> None:
        self.objective = objective
        self.trial = trial
        self.trial_cfg = trial_cfg
        self.factors = factors  # searched key -> multiple of the LR finder's suggestion
        self.reported: set[int] = set()  # steps stored in the study (by any attempt)
        self.own: dict[int, float] = {}  # step -> value of the attempt running now
        self.rungs: dict[str, Any] = {}  # the rungs it passed (successive halving, Hyperband)
        self.restarted = False  # a halving restarted the run: the stored steps mix attempts
        self.noise_scale: list[float | None] = []  # per epoch of the latest attempt
        # When the length of the schedule is searched, trials report at the percent of their
        # own one-cycle schedule done, so the pruner compares a 30-epoch run half-way with a
        # 5-epoch run half-way, not with its annealed end (`study.report_steps`).
        self.by_fraction = any(p.name == "trainer.epochs" for p in objective.params)
        pruner = objective.cfg.study.pruner
        judged_by_step = str(pruner.type) in STEP_PRUNERS
        self.warmup = int(pruner.n_warmup_steps) if judged_by_step else 0
        self.schedule(int(trial_cfg.trainer.epochs))
        self.curve: list[dict[str, float]] = []  # the attempt's validation curve

    def schedule(self, epochs: int) -> None:
        """The run's epochs, and the pruner step each epoch reports at."""
        self.epochs = epochs
        self.steps = report_steps(self.objective.cfg.study.pruner, self.objective.params, epochs)

    def attempt(self, bs: int) -> engine.TrainResult:
        obj, trial = self.objective, self.trial
        self.noise_scale = []  # a halved attempt restarts from scratch
        self.own, self.rungs = {}, {}
        # A large batch takes few steps per epoch: batch_size.min_steps may give it more epochs.
        epochs = batch_size.epochs_for(bs, len(obj.dataset.train), self.trial_cfg)
        self.schedule(epochs)
        self.curve = []
        sized = {"trainer.batch_size": bs, "trainer.epochs": epochs}
        run_cfg = apply_params(self.trial_cfg, sized)
        for name, factor in self.factors.items():
            base, source = lr_seed.seeded_lr(trial.study, run_cfg, obj.dataset, bs)
            run_cfg = apply_params(run_cfg, {name: base * factor})
            trial.set_user_attr(trial_attrs.LR_FINDER, base)
            trial.set_user_attr(trial_attrs.LR_SOURCE, source)
        trial.set_user_attr(trial_attrs.LR_VALUE, float(run_cfg.trainer.lr))
        return engine.train(
            run_cfg,
            obj.dataset,
            self.report,
            quiet=True,
            cbs=batch_size.guards(obj.cfg),
        )

    def report(self, epoch: int, metrics: dict[str, float]) -> None:
        metric, trial = self.objective.metric, self.trial
        self.noise_scale.append(metrics.get(NOISE_SCALE_KEY))
        if self.objective.tracker is not None:
            self.objective.tracker.log_epoch(epoch, metrics)
        self.curve.append(curve_point(epoch, metrics))
        trial.set_user_attr(trial_attrs.CURVE, self.curve)
        if self.objective.multi:
            return  # Optuna cannot report or prune a trial of several values: wandb has them
        if metric not in metrics:
            raise KeyError(f"study.metric={metric!r} is not one of {sorted(metrics)}")
        step = self.steps.get(epoch)
        if step is None:
            return  # an epoch between two grid steps: neither reported nor judged
        self.own[step] = metrics[metric]
        if step in self.reported:  # restarted after a halving: this attempt's value stands
            optuna_internals.replace_report(trial, step, metrics[metric])
        else:
            self.reported.add(step)
            trial.report(metrics[metric], step=step)
        # By fraction, the pruner's own warm-up (in steps) is off: a trial runs
        # study.pruner.n_warmup_steps of its own epochs before it may be pruned.
        if self.by_fraction and epoch < self.warmup:
            return
        if epoch == self.epochs:
            return  # the run is done: stopping it now would save nothing
        if self.should_prune():
            trial.set_user_attr(trial_attrs.REASON, f"{trial_attrs.PRUNED_AT}{epoch}")
            raise optuna.TrialPruned(f"{metric}={metrics[metric]:.4f} at epoch {epoch}")

    def should_prune(self) -> bool:
        if not self.restarted:
            return self.trial.should_prune()
        # The dead attempt may have reported later steps than this one has reached, and
        # should_prune() would judge the last: this attempt is judged on its own reports.
        return optuna_internals.should_prune_on(self.trial, self.own, self.rungs)

    def halved(self, h: batch_size.Halving) -> None:
        self.restarted = True
        log.warning(
            "trial %d: %s at batch %d (%s), restarting at %d",
            self.trial.number,
            h.cause,
            h.from_bs,
            h.detail,
            h.to_bs,
        )


def curve_point(epoch: int, metrics: dict[str, float]) -> dict[str, float]:
    """One point of a trial's validation curve: where the run stands and what it scores."""
    point = {"epoch": float(epoch)}
    point["steps"] = metrics.get(engine.TRAIN_STEPS, 0.0)
    point["seconds"] = metrics.get(engine.TRAIN_SECONDS, 0.0)
    point.update({k: round(v, 6) for k, v in metrics.items() if k.startswith("val/")})
    return point


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
        trial_attrs.BATCH_REQUESTED: int(trial_cfg.trainer.batch_size),
    }


Predictions = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def valid_predictions(result: engine.TrainResult) -> Predictions | None:
    """(predicted class, label, loss) per validation image of the trained model."""
    learn = result.learner
    if learn is None:
        return None
    with learn.no_bar():
        probs, targets, losses = learn.get_preds(ds_idx=1, with_loss=True)
    preds = torch.as_tensor(probs).argmax(dim=-1)
    return preds, torch.as_tensor(targets), torch.as_tensor(losses)


def save_predictions(predictions: Predictions | None, directory: Path) -> None:
    """Validation predictions of the trial, for the report's confusion matrix. Sweeps never
    touch the test split: only `final` evaluates a chosen config on it, once."""
    if predictions is None:
        return
    preds, targets, _ = predictions
    write_atomic(
        directory / VALID_PREDICTIONS,
        lambda f: np.savez_compressed(
            f, preds=preds.numpy().astype(np.int32), labels=targets.numpy()
        ),
    )
