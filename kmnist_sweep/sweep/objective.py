"""The Optuna objective: suggest -> train -> report every epoch -> prune -> return the metric
(or, for a multi-objective study, the value of each of study.metrics, never pruned).

`TrainingObjective.__call__` tells a trial's whole story on one screen; the helpers below it
write the trial's records. This is the only module that touches `optuna.Trial`: the state a
trial's attempts keep, and what it records, are computed in sweep/trial_record.py. Around the
engine it adds the two ideas of the article: the LR is seeded from the LR finder, and a batch
that runs out of memory or diverges is halved and the run restarted
(`batch_size.fit_with_fallback`).

    objective = make_objective(cfg)      # the sweep protocol: check, prepare, constraint,
    study.optimize(objective)            # __call__ per trial, finish (the report)
"""

from __future__ import annotations

import atexit
import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig
from optuna.trial import FrozenTrial

from kmnist_sweep import trial_attrs
from kmnist_sweep.config.check import objectives
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
from kmnist_sweep.results import report
from kmnist_sweep.results.batchsize import answer_text, size_answer, table_text
from kmnist_sweep.results.tracking import Tracker
from kmnist_sweep.sweep import budgeted, lr_seed, optuna_internals
from kmnist_sweep.sweep.study import batch_size_constraint
from kmnist_sweep.sweep.trial_record import (
    TrialRun,
    curve_point,
    performance,
    run_config,
    save_predictions,
    valid_predictions,
)
from kmnist_sweep.train import batch_size, engine
from kmnist_sweep.train.noise_scale import NOISE_SCALE_KEY
from kmnist_sweep.train.standard_error import standard_errors

log = logging.getLogger(__name__)


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

    # ---------------------------------------------------------------- one trial

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        values = suggest_params(trial, self.params)
        run = self.start(trial, values)  # the trial's config, first attributes, wandb run

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:  # after every epoch
            step = self.keep_epoch(trial, run, epoch, metrics)  # None: nothing to report
            if step is None:
                return
            value = metrics[self.metric]
            if run.first_report(step, value):
                trial.report(value, step=step)
            else:  # restarted after a halving: this attempt's value replaces the dead one's
                optuna_internals.replace_report(trial, step, value)
            if run.may_prune(epoch) and should_prune(trial, run):
                trial.set_user_attr(trial_attrs.REASON, f"{trial_attrs.PRUNED_AT}{epoch}")
                raise optuna.TrialPruned(f"{self.metric}={value:.4f} at epoch {epoch}")

        def train(batch: int) -> engine.TrainResult:  # one attempt, from scratch
            run_cfg = run.restart(batch, len(self.dataset.train))  # its epochs at this batch
            run_cfg = self.seed_lr(trial, run, run_cfg)
            guards = batch_size.guards(self.cfg)  # a diverging run stops
            return engine.train(run_cfg, self.dataset, on_epoch, quiet=True, cbs=guards)

        minimum = int(self.cfg.batch_size.min)
        with self.ending(trial, run):  # whatever the end: its batch sizes, its wandb run
            result = batch_size.fit_with_fallback(train, run.fallback, minimum, run.halved)
            self.record_fit(trial, result)
        self.record_result(trial, run, result)
        if self.multi:
            measured = {**result.valid, **performance(result)}
            return tuple(float(measured[metric]) for metric in self.metrics)
        return result.valid[self.metric]

    def start(self, trial: optuna.Trial, values: dict[str, Any]) -> TrialRun:
        """The trial's config from its suggested `values` (an LR searched as a factor set
        aside, a budgeted trial's epochs added), its first attributes and its wandb run."""
        if self.tracker is None:
            self.tracker = Tracker(self.cfg.tracking, str(self.cfg.study.name))
            atexit.register(self.tracker.close)
        factors = {name: values.pop(f"{name}.factor") for name in self.seeded}
        if self.rungs is not None:
            values[EPOCHS_KEY] = self.rung_epochs(trial)
        trial_cfg = apply_params(self.cfg, values)
        trial.set_user_attr(trial_attrs.OVERRIDES, to_overrides(values))
        if self.dataset.note:
            trial.set_user_attr(trial_attrs.NOTE, self.dataset.note)
        run = TrialRun(
            trial.number, trial_cfg, values, factors, self.params, self.cfg.study.pruner
        )
        self.tracker.start_trial(trial.number, run_config(trial_cfg, trial.number, trial.params))
        return run

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

    def seed_lr(self, trial: optuna.Trial, run: TrialRun, run_cfg: DictConfig) -> DictConfig:
        """`run_cfg` with each LR searched as a factor set to that factor of the LR finder's
        LR at this attempt's batch size; the LRs as trial attributes."""
        bs = int(run_cfg.trainer.batch_size)
        for name, factor in run.factors.items():
            base, source = lr_seed.seeded_lr(trial.study, run_cfg, self.dataset, bs)
            run_cfg = apply_params(run_cfg, {name: base * factor})
            trial.set_user_attr(trial_attrs.LR_FINDER, base)
            trial.set_user_attr(trial_attrs.LR_SOURCE, source)
        run.lr = float(run_cfg.trainer.lr)
        trial.set_user_attr(trial_attrs.LR_VALUE, run.lr)
        return run_cfg

    def keep_epoch(
        self, trial: optuna.Trial, run: TrialRun, epoch: int, metrics: dict[str, float]
    ) -> int | None:
        """An epoch's metrics to wandb and to the trial's curve and noise scale. Returns the
        pruner step the epoch reports at; None when it reports nothing."""
        run.noise_scale.append(metrics.get(NOISE_SCALE_KEY))
        if self.tracker is not None:
            self.tracker.log_epoch(epoch, metrics)
        run.curve.append(curve_point(epoch, metrics))
        trial.set_user_attr(trial_attrs.CURVE, run.curve)
        if self.multi:
            return None  # Optuna cannot report or prune a trial of several values: wandb has them
        if self.metric not in metrics:
            raise KeyError(f"study.metric={self.metric!r} is not one of {sorted(metrics)}")
        return run.steps.get(epoch)  # None: an epoch between two grid steps

    @contextlib.contextmanager
    def ending(self, trial: optuna.Trial, run: TrialRun) -> Iterator[None]:
        """However the trial ends (complete, pruned, failed), what happened to its batch size
        (and its LR) is written, and its wandb run ends with that state."""
        state, reason = "failed", ""
        try:
            yield
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
            for key, value in run.fallback.as_attrs().items():
                trial.set_user_attr(key, value)
            if run.noise_scale:
                trial.set_user_attr(trial_attrs.NOISE_SCALE, run.noise_scale)
            assert self.tracker is not None  # opened by start()
            self.tracker.end_trial(state, reason, trial_summary(trial))

    def record_fit(self, trial: optuna.Trial, result: engine.TrainResult) -> None:
        """The trained run's validation metrics and cost; a run that did not learn says so."""
        trial.set_user_attr(trial_attrs.VALID, result.valid)
        for key, value in performance(result).items():
            trial.set_user_attr(key, value)
        labels = self.dataset.valid.labels
        verdict = batch_size.learning_verdict(result.valid.get("val/acc", 0.0), labels)
        if verdict is not None:
            log.warning("trial %d: %s", trial.number, verdict)
            trial.set_user_attr(trial_attrs.DID_NOT_LEARN, verdict)

    def record_result(
        self, trial: optuna.Trial, run: TrialRun, result: engine.TrainResult
    ) -> None:
        """A complete trial's overrides as they retrain it, its metrics' standard errors,
        and its validation predictions (for the report)."""
        trial.set_user_attr(trial_attrs.OVERRIDES, to_overrides(run.final_values()))
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

    # ---------------------------------------------------------------- the sweep protocol

    def check(self) -> None:
        """Load, and so check, the data before the sweep opens its storage (DataError)."""
        _ = self.dataset

    def prepare(self, study: optuna.Study) -> None:
        searched = [p.name for p in self.params if p.type == "lr_finder" and p.searched]
        lr_seed.prepare(study, self.cfg, self.seeded, lambda: self.dataset, searched)

    def constraint(self, trial: FrozenTrial) -> Sequence[float]:
        return batch_size_constraint(trial)

    def finish(self, study: optuna.Study) -> None:
        """The report, and for a batch-size study its answer on one line."""
        if self.cfg.study.report:
            log.info("report: %s", report.report_sweep(study, self.cfg))
        answer = size_answer(study, self.metric, self.cfg.batch_size.get("target"))
        if answer is not None:
            print(f"{table_text(answer)}\n{answer_text(answer)}", flush=True)


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


def should_prune(trial: optuna.Trial, run: TrialRun) -> bool:
    """The pruner's verdict on the trial. After a restart the dead attempt may have reported
    later steps than this one has reached, and should_prune() would judge the last: this
    attempt is judged on its own reports."""
    if not run.restarted:
        return trial.should_prune()
    return optuna_internals.should_prune_on(trial, run.own, run.rungs)


def trial_summary(trial: optuna.Trial) -> dict[str, Any]:
    return {"trial": trial.number, **trial.params, **trial.user_attrs}
