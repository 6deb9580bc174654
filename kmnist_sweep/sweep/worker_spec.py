"""How every worker of one sweep runs, worked out once from the config and the run: the
runner's own loop gets the spec as it is, worker processes and SLURM jobs as JSON data.

    spec = worker_spec(cfg, resolved, objective_path, budget_end)
    work(study, objective, spec)                    # in this process
    worker_run(*from_payload(to_payload(spec, i)))  # worker i, elsewhere
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

SLOT_LOCK = ".slots.lock"  # file under output_dir that workers on one host take turns on


@dataclass(frozen=True)
class WorkerSpec:
    cfg: dict[str, Any]  # the resolved config: worker processes build study and objective
    objective: str | None  # `module:function` worker processes import (None: in-process)
    n_trials: int  # finished trials the study should hold
    since: datetime.datetime  # this run's start: its trials' failures count, not older ones
    deadline: float | None  # no trial starts after it (Unix time; study.timeout, a budget)
    budget_end: float | None  # a budgeted sweep's end: its workers plan trials until then
    poll: float  # seconds between an idle worker's checks
    lock_path: Path | None  # the slot lock of the workers on one host (None: no lock)
    max_failed: int | None  # trials of this run that may raise before the worker stops
    storage_patience: float  # seconds a storage that does not answer is retried


def worker_spec(
    cfg: DictConfig, resolved: dict[str, Any], objective: str | None, budget_end: float | None
) -> WorkerSpec:
    """The spec of a sweep that starts now; with a budget, its end is the deadline."""
    study_cfg = cfg.study
    timeout, max_failed = study_cfg.timeout, study_cfg.max_failed
    if budget_end is not None:
        deadline: float | None = budget_end
    else:
        deadline = None if timeout is None else time.time() + float(timeout)
    return WorkerSpec(
        cfg=resolved,
        objective=objective,
        n_trials=int(study_cfg.n_trials),
        since=datetime.datetime.now(),
        deadline=deadline,
        budget_end=budget_end,
        poll=float(study_cfg.poll_interval),
        lock_path=Path(str(study_cfg.output_dir)) / SLOT_LOCK,
        max_failed=None if max_failed is None else int(max_failed),
        storage_patience=float(study_cfg.storage_patience),
    )


def to_payload(spec: WorkerSpec, index: int) -> dict[str, Any]:
    """Worker `index`'s spec as JSON data (a worker process's stdin, a SLURM job's input)."""
    payload = dataclasses.asdict(spec)
    payload["since"] = spec.since.isoformat()
    payload["lock_path"] = None if spec.lock_path is None else str(spec.lock_path)
    payload["index"] = index
    return payload


def from_payload(payload: dict[str, Any]) -> tuple[WorkerSpec, int]:
    """`to_payload`'s data back: the spec and the worker's index."""
    fields = dict(payload)
    index = int(fields.pop("index"))
    lock_path = fields["lock_path"]
    fields["since"] = datetime.datetime.fromisoformat(fields["since"])
    fields["lock_path"] = None if lock_path is None else Path(lock_path)
    return WorkerSpec(**fields), index
