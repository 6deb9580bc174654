"""Every user attribute we store on Optuna trials and studies: its name, who writes it, what
it holds. Writers and readers import the names from here, never spell them out.

Trial attributes are what trials.csv, the report, the dashboard and wandb show; study
attributes describe the study itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# ---------------------------------------------------------------- written by the worker loop

WORKER = "worker"  # index of the worker process that ran the trial (str)
STARTED = "started"  # the trial's own number, once its first heartbeat is stored: a retry
# inherits the attributes of the trial it retries, this one tells whether it started itself
PROCESS = "process"  # host:pid of that process: its launcher fails the trial if it dies
SURPLUS = "surplus"  # True: started after the study was full, failed on purpose
STORAGE_ERROR = "storage_error"  # why the storage lost the trial (one line)
INTERRUPTED = "interrupted"  # the signal that stopped it: SIGINT | SIGTERM, or SIGKILL
# (any signal that kills at once) as its launcher saw its worker process die
ERROR = "error"  # the trial's own exception, one line: counted against study.max_failed

# ---------------------------------------------------------------- written by the runner

QUEUED = "queued"  # why the runner queued the trial's values (study.start_from_defaults)

# Trials of a budgeted study (study.budget), queued by the planner (sweep/budgeted.py):
BUDGET_RUNG = "budget/rung"  # index of the successive-halving rung the trial runs at
BUDGET_EPOCHS = "budget/epochs"  # epochs of that rung, which the trial trains
BUDGET_SOURCE = "budget/source"  # the trial whose sampled config it retrains (itself at rung 0)

# ---------------------------------------------------------------- written by the objective

OVERRIDES = "overrides"  # Hydra overrides that retrain the trial exactly (list[str])
NOTE = "note"  # the dataset's protocol note, e.g. kmnist_sample is not the official split
REASON = "reason"  # why a trial was pruned (one line)
PRUNED_AT = "pruned at epoch "  # REASON of a trial the pruner stopped, before its epoch
BATCH_REQUESTED = "batch_size/requested"  # images per step the sampler asked for
BATCH_EFFECTIVE = "batch_size/effective"  # images per step of the attempt that counted
BATCH_FITTED = "batch_size/fitted"  # False: not even batch_size.min fitted (the constraint)
BATCH_HALVINGS = "batch_size/halvings"  # [{from_bs, to_bs, cause, detail}, ...]
LR_FINDER = "lr/finder"  # the LR finder's suggestion for the trial's batch size, per step
LR_SOURCE = "lr/source"  # where that LR came from, one line
LR_VALUE = "lr/value"  # the peak LR the trial trained at, per step
VALID = "val"  # final validation metrics {"val/acc": ..., "val/loss": ...}
VALID_SE = "val_se"  # their standard errors {"val/acc_se": ..., ...} (train/standard_error.py)
CURVE = "curve"  # per epoch: {epoch, steps, seconds (training, cumulative), val/...}
DID_NOT_LEARN = "did_not_learn"  # why a run that trained is no better than chance (one line)
SECONDS = "seconds"  # wall time of the training run that counted, seconds
TRAIN_SECONDS = "speed/train_s"  # seconds in training phases of that run (validation excluded)
IMAGES_PER_S = "speed/images_per_s"  # training images per second (validation excluded)
SECONDS_PER_EPOCH = "speed/s_per_epoch"  # seconds per training epoch (validation excluded)
PEAK_MEMORY_MB = "memory/peak_mb"  # MiB: CUDA max_memory_allocated, or peak RSS on a CPU
NOISE_SCALE = "noise_scale"  # gradient noise scale B_simple per epoch of the run that counted,
# images (list[float | None]; None: undefined that epoch), train/noise_scale.py

# What a trial cost: a multi-objective study may optimise these beside a validation metric
# (study.metrics); the objective returns the attribute's value.
COSTS = (TRAIN_SECONDS, IMAGES_PER_S, SECONDS_PER_EPOCH, PEAK_MEMORY_MB)

# ---------------------------------------------------------------- study attributes

STUDY_METRIC = "metric"  # the metric key the study optimises, e.g. val/acc; a list of them
# for a multi-objective study, in the order of its values (also its Optuna metric names)
STUDY_SEARCH_SPACE = "search_space"  # the resolved search space the study was created with
BUDGET_SPENT = "budget/spent_s"  # seconds of study.budget that runs of the study have used
BUDGET_RUNS = "budget/runs"  # per run: its plan, the time of each phase, the answer (list)
LR_CURVE_PREFIX = "lr_finder:"  # + curve key: a cached LR range test (its artifact id,
# batch size and suggested LRs; the curve is an artifact, sweep/lr_seed.py)


def overrides_of(attrs: Mapping[str, Any]) -> list[str]:
    """The recorded overrides of a trial, [] when it has none."""
    return list(attrs.get(OVERRIDES) or [])


def batch_sizes(attrs: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """(requested, effective) batch sizes of a trial; None where not recorded."""
    requested, effective = attrs.get(BATCH_REQUESTED), attrs.get(BATCH_EFFECTIVE)
    return (
        None if requested is None else int(requested),
        None if effective is None else int(effective),
    )


def standard_error(attrs: Mapping[str, Any], metric: str) -> float | None:
    """The recorded standard error of a trial's final `metric`, None where there is none."""
    value = (attrs.get(VALID_SE) or {}).get(f"{metric}_se")
    return None if value is None else float(value)
