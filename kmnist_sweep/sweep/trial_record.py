"""One trial of the objective as it runs, and what it leaves behind, without the Optuna trial:
sweep/objective.py asks and tells the trial, this module keeps the state it does so from.

    run = TrialRun(number, trial_cfg, values, factors, params, cfg.study.pruner)
    run_cfg = run.restart(batch, n_train)   # each attempt, from scratch
    run.first_report(step, value)           # False: an earlier attempt reported that step
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from kmnist_sweep import trial_attrs
from kmnist_sweep.config.schema import STEP_PRUNERS
from kmnist_sweep.config.search_space import Param, apply_params
from kmnist_sweep.files import write_atomic
from kmnist_sweep.results.report import VALID_PREDICTIONS
from kmnist_sweep.sweep.study import report_steps
from kmnist_sweep.train import batch_size, engine

log = logging.getLogger(__name__)


class TrialRun:
    """One trial's attempts: each at a batch size, restarted from scratch after a halving."""

    def __init__(
        self,
        number: int,
        trial_cfg: DictConfig,
        values: dict[str, Any],
        factors: dict[str, float],
        params: list[Param],
        pruner_cfg: DictConfig,
    ) -> None:
        self.number = number  # the trial's
        self.cfg = trial_cfg  # the config its suggested values give
        self.values = values  # those values (an LR searched as a factor excepted)
        self.factors = factors  # searched key -> multiple of the LR finder's suggestion
        self.params = params
        self.pruner_cfg = pruner_cfg
        self.fallback = batch_size.Fallback(int(trial_cfg.trainer.batch_size))
        self.lr = 0.0  # the LR of the latest attempt
        self.reported: set[int] = set()  # steps stored in the study (by any attempt)
        self.own: dict[int, float] = {}  # step -> value of the attempt running now
        self.rungs: dict[str, Any] = {}  # the rungs it passed (successive halving, Hyperband)
        self.restarted = False  # a halving restarted the run: the stored steps mix attempts
        self.noise_scale: list[float | None] = []  # per epoch of the latest attempt
        self.curve: list[dict[str, float]] = []  # the attempt's validation curve
        # When the length of the schedule is searched, trials report at the percent of their
        # own one-cycle schedule done, so the pruner compares a 30-epoch run half-way with a
        # 5-epoch run half-way, not with its annealed end (`study.report_steps`).
        self.by_fraction = any(p.name == "trainer.epochs" for p in params)
        judged_by_step = str(pruner_cfg.type) in STEP_PRUNERS
        self.warmup = int(pruner_cfg.n_warmup_steps) if judged_by_step else 0
        self.schedule(int(trial_cfg.trainer.epochs))

    def schedule(self, epochs: int) -> None:
        """The run's epochs, and the pruner step each epoch reports at."""
        self.epochs = epochs
        self.steps = report_steps(self.pruner_cfg, self.params, epochs)

    def restart(self, batch: int, n_train: int) -> DictConfig:
        """A fresh attempt at `batch`, and its config (its LR is the objective's to seed).
        A large batch takes few steps per epoch: batch_size.min_steps may give it more epochs."""
        self.noise_scale, self.own, self.rungs = [], {}, {}
        epochs = batch_size.epochs_for(batch, n_train, self.cfg)
        self.schedule(epochs)
        self.curve = []
        return apply_params(self.cfg, {"trainer.batch_size": batch, "trainer.epochs": epochs})

    def first_report(self, step: int, value: float) -> bool:
        """Keep this attempt's `value` at `step`; False when a dead attempt already stored
        that step (Optuna keeps a step's first report: the objective replaces it)."""
        self.own[step] = value
        if step in self.reported:
            return False
        self.reported.add(step)
        return True

    def may_prune(self, epoch: int) -> bool:
        """Whether the pruner may stop the run after `epoch`. By fraction, the pruner's own
        warm-up (in steps) is off: a trial runs study.pruner.n_warmup_steps of its own epochs
        before it may be pruned. After the last epoch stopping the run would save nothing."""
        if self.by_fraction and epoch < self.warmup:
            return False
        return epoch != self.epochs

    def halved(self, h: batch_size.Halving) -> None:
        self.restarted = True
        log.warning(
            "trial %d: %s at batch %d (%s), restarting at %d",
            self.number,
            h.cause,
            h.from_bs,
            h.detail,
            h.to_bs,
        )

    def final_values(self) -> dict[str, Any]:
        """What retrains this trial: the seeded LR, the batch that actually fitted, its epochs."""
        final = {**self.values, "trainer.batch_size": self.fallback.effective}
        if self.epochs != int(self.cfg.trainer.epochs):
            final["trainer.epochs"] = self.epochs
        final.update({name: self.lr for name in self.factors})
        return final


def performance(result: engine.TrainResult) -> dict[str, Any]:
    """What the trial cost, as trial attributes: speed, time and memory of the run that counted."""
    return {
        trial_attrs.SECONDS: round(result.seconds, 2),
        trial_attrs.TRAIN_SECONDS: round(result.train_seconds, 3),
        trial_attrs.IMAGES_PER_S: round(result.images_per_s, 1),
        trial_attrs.SECONDS_PER_EPOCH: round(result.seconds_per_epoch, 3),
        trial_attrs.PEAK_MEMORY_MB: round(result.peak_memory / 2**20, 1),
    }


def curve_point(epoch: int, metrics: dict[str, float]) -> dict[str, float]:
    """One point of a trial's validation curve: where the run stands and what it scores."""
    point = {"epoch": float(epoch)}
    point["steps"] = metrics.get(engine.TRAIN_STEPS, 0.0)
    point["seconds"] = metrics.get(engine.TRAIN_SECONDS, 0.0)
    point.update({k: round(v, 6) for k, v in metrics.items() if k.startswith("val/")})
    return point


def run_config(trial_cfg: DictConfig, number: int, params: dict[str, Any]) -> dict[str, Any]:
    """What wandb shows for a trial: the resolved config and its params; the effective batch
    size and the seeded LR arrive in the run's summary once known."""
    resolved = OmegaConf.to_container(trial_cfg, resolve=True)
    assert isinstance(resolved, dict)
    resolved.pop("search_space", None)
    return {
        **resolved,
        "trial": number,
        "params": dict(params),
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
