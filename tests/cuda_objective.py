"""The real objective, recording where each trial trained: for the gpu tests whose workers
share one GPU (tests/train/test_gpu.py).

    debug.objective=tests.cuda_objective:make_recording_objective

Each finished trial gets the user attrs `device` (trainer.device as its worker got it),
`cuda_visible_devices` (the worker's CUDA_VISIBLE_DEVICES) and `cuda_peak_bytes` (the most
CUDA memory the worker's PyTorch held so far: 0 if it never touched the GPU).
"""

from __future__ import annotations

import os

import optuna
import torch
from omegaconf import DictConfig

import kmnist_sweep  # noqa: F401  (package first, as everywhere)
from kmnist_sweep.sweep.objective import TrainingObjective


class RecordingObjective(TrainingObjective):
    def __call__(self, trial: optuna.Trial) -> float:
        try:
            return super().__call__(trial)
        finally:  # pruned trials too: they trained until the pruner stopped them
            trial.set_user_attr("device", str(self.cfg.trainer.device))
            trial.set_user_attr("cuda_visible_devices", os.environ.get("CUDA_VISIBLE_DEVICES"))
            trial.set_user_attr("cuda_peak_bytes", int(torch.cuda.max_memory_allocated()))


def make_recording_objective(cfg: DictConfig) -> RecordingObjective:
    return RecordingObjective(cfg)
