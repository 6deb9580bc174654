"""Leslie Smith's LR range test on our engine, and the rules that turn its curve into an LR.

The range test raises the LR exponentially from `start_lr` to `end_lr` over `num_it`
steps, records the bias-corrected EWMA of the loss, stops once the loss explodes and
restores the weights (fastai's `Learner.lr_find`). Each suggestion rule is a pure
function of the recorded (lrs, losses), so it is tested on synthetic curves.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib
import torch
from fastai.callback.schedule import minimum, valley
from fastai.learner import AvgSmoothLoss, Learner
from omegaconf import DictConfig

from kmnist_sweep.data.contract import Dataset
from kmnist_sweep.errors import ConfigError
from kmnist_sweep.train import engine

matplotlib.use("Agg")  # files only: never open a window
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

log = logging.getLogger(__name__)

Rule = Callable[[Sequence[float], Sequence[float]], float]


# ---------------------------------------------------------------- pure rules


def finite_prefix(
    lrs: Sequence[float], losses: Sequence[float]
) -> tuple[list[float], list[float]]:
    """The curve up to its first NaN or infinite loss: nothing after a blow-up is informative."""
    cut = next((i for i, v in enumerate(losses) if not math.isfinite(v)), len(losses))
    return list(lrs[:cut]), list(losses[:cut])


def trim(lrs: Sequence[float], losses: Sequence[float]) -> tuple[list[float], list[float]]:
    """fastai's window: drop the first tenth (EWMA warm-up) and the last five (the explosion)."""
    n = len(losses)
    lrs, losses = list(lrs[n // 10 : n - 5]), list(losses[n // 10 : n - 5])
    return finite_prefix(lrs, losses)


def as_tensors(lrs: Sequence[float], losses: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The finite part of the curve as the float64 tensors fastai's rules take (float64, so
    a suggested LR is exactly one of the recorded ones)."""
    lrs, losses = finite_prefix(lrs, losses)
    if not losses:
        raise ValueError("the LR finder recorded no finite loss")
    return torch.tensor(lrs, dtype=torch.float64), torch.tensor(losses, dtype=torch.float64)


def suggest_bottom(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """The LR of the smoothed minimum itself (the point fastai's `minimum` marks): Smith's
    peak for SGD's one cycle."""
    _, (lr, _) = minimum(*as_tensors(lrs, losses), len(lrs))
    return float(lr)


def suggest_minimum(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """fastai's `minimum`: an order of magnitude below the LR of the smoothed minimum (for
    Adam)."""
    lr, _ = minimum(*as_tensors(lrs, losses), len(lrs))
    return float(lr)


def suggest_valley(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """fastai's `valley`: the longest run of falling loss, taken about half-way down it."""
    lr, _ = valley(*as_tensors(lrs, losses), len(lrs))
    return float(lr)


RULES: dict[str, Rule] = {
    "minimum": suggest_minimum,
    "valley": suggest_valley,
    "bottom": suggest_bottom,
}
# `suggestion: auto`: the rule that lands nearest a good peak LR for each optimiser
# (docs/benchmarks.md). Adam's step is normalised, so the loss bottoms out at an LR about 10x
# its best peak; SGD's best one-cycle peak sits at or just above the bottom.
AUTO_RULES = {"adamw": "minimum", "sgd": "bottom"}


def rule_for(cfg: DictConfig) -> str:
    """The suggestion rule this config uses: `lr_finder.suggestion`, or auto's per optimiser."""
    rule = str(cfg.lr_finder.suggestion)
    return AUTO_RULES[str(cfg.trainer.optimizer)] if rule == "auto" else rule


def suggest(lrs: Sequence[float], losses: Sequence[float], rule: str) -> float:
    if rule not in RULES:
        raise ConfigError(f"lr_finder.suggestion={rule!r} is not one of {', '.join(RULES)}")
    return RULES[rule](*trim(lrs, losses))


def scale_lr(lr: float, from_bs: int, to_bs: int, rule: str) -> float:
    """Carry an LR found at one batch size to another: linear (Goyal et al.) or square root."""
    if rule == "linear":
        return lr * to_bs / from_bs
    if rule == "sqrt":
        return lr * math.sqrt(to_bs / from_bs)
    raise ConfigError(f"lr_finder.scale={rule!r} is not linear or sqrt")


# ---------------------------------------------------------------- running the range test


@dataclass(frozen=True)
class Curve:
    lrs: list[float]  # learning rate per step
    losses: list[float]  # EWMA-smoothed training loss per step
    batch_size: int  # images per step the test ran at
    suggestions: dict[str, float]  # rule name -> suggested LR

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> Curve:
        return Curve(**json.loads(text))

    def lr(self, rule: str) -> float:
        """The LR `rule` suggests, also from a curve cached before that rule existed."""
        if rule in self.suggestions:
            return self.suggestions[rule]
        return suggest(self.lrs, self.losses, rule)


def curve_key(cfg: DictConfig, batch_size: int) -> str:
    """What the curve depends on: data, model, stem, weights, batch size, precision, the
    optimiser and its settings, the loss (label smoothing) and the test's range. A study
    caches curves by this key, so a space that searches, say, the optimiser with a finder
    LR must not reuse one optimiser's curve for another (SGD's minimum is not AdamW's)."""
    tcfg = cfg.trainer
    parts = [
        cfg.data.name,
        cfg.model.arch,
        cfg.model.stem,
        f"pretrained={bool(cfg.model.pretrained)}",
        f"bs{batch_size}",
        str(tcfg.precision),
        f"{tcfg.optimizer} m{float(tcfg.momentum):g} wd{float(tcfg.weight_decay):g}",
        f"ls{float(tcfg.label_smoothing):g}",
        f"{float(cfg.lr_finder.start_lr):g}-{float(cfg.lr_finder.end_lr):g}x{cfg.lr_finder.num_it}",
    ]
    digest = hashlib.sha1("|".join(parts).encode()).hexdigest()[:8]
    return f"{cfg.data.name}-{cfg.model.arch}-{cfg.model.stem}-bs{batch_size}-{digest}"


def range_test(learn: Learner, fcfg: DictConfig) -> tuple[list[float], list[float]]:
    """Run fastai's range test on `learn`; its weights are restored afterwards."""
    saved_smoother = learn.recorder.smooth_loss
    # The Recorder's loss smoothing is the curve's: lr_finder.beta sets it for the test.
    set_smoother(learn, AvgSmoothLoss(beta=float(fcfg.beta)))
    with tempfile.TemporaryDirectory() as tmp:
        saved_path = learn.path
        learn.path = Path(tmp)  # fastai saves the weights here to restore them afterwards
        try:
            with learn.no_bar(), learn.no_logging():
                learn.lr_find(
                    start_lr=float(fcfg.start_lr),
                    end_lr=float(fcfg.end_lr),
                    num_it=int(fcfg.num_it),
                    show_plot=False,
                    suggest_funcs=None,
                )
        finally:
            learn.path = saved_path
            set_smoother(learn, saved_smoother)
            engine.close_autocast(learn)
    return [float(v) for v in learn.recorder.lrs], [float(v) for v in learn.recorder.losses]


def set_smoother(learn: Learner, smoother: AvgSmoothLoss) -> None:
    """The Recorder's loss smoother. The Recorder is a fastai Callback, and a Callback warns
    on setting any name the Learner also answers to, as it does to smooth_loss (through the
    Recorder itself): that warning reached every user's terminal, about nothing."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You are shadowing an attribute")
        learn.recorder.smooth_loss = smoother


def run_range_test(cfg: DictConfig, dataset: Dataset, batch_size: int) -> Curve:
    """The range test on a fresh learner for `cfg` at `batch_size`, with every suggestion."""
    learn = engine.build_learner(cfg, dataset, batch_size=batch_size)
    lrs, losses = range_test(learn, cfg.lr_finder)
    suggestions = {name: suggest(lrs, losses, name) for name in RULES}
    return Curve(lrs, losses, batch_size, suggestions)


# ---------------------------------------------------------------- files


def save_csv(curve: Curve, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["lr", "smoothed_loss"])
        out.writerows(zip(curve.lrs, curve.losses, strict=True))
    return path


def plot_curve(curve: Curve, path: Path, chosen: str | None = None) -> Path:
    """Smoothed loss against LR (log axis): the curve's minimum, and each suggestion (the
    `minimum` rule's is a tenth of the minimum's LR, a separate point; `bottom`'s is the
    minimum's) on the curve."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    lrs, losses = finite_prefix(curve.lrs, curve.losses)
    ax.plot(lrs, losses, color="0.2")
    low_lrs, low_losses = trim(curve.lrs, curve.losses)
    if low_losses:
        best = min(range(len(low_losses)), key=low_losses.__getitem__)
        ax.plot(
            low_lrs[best],
            low_losses[best],
            "v",
            color="tab:blue",
            label=f"smoothed minimum: {low_lrs[best]:.2e}",
        )
    for (name, lr), colour in zip(
        curve.suggestions.items(), ("tab:red", "tab:green", "tab:purple"), strict=False
    ):
        idx = min(range(len(lrs)), key=lambda i: abs(math.log(lrs[i]) - math.log(lr)))
        style = "o" if name == chosen else "x"
        label = "minimum / 10" if name == "minimum" else name
        ax.plot(
            lr,
            losses[idx],
            style,
            color=colour,
            label=f"{label}: {lr:.2e}" + (" (used)" if name == chosen else ""),
        )
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("smoothed training loss")
    ax.set_title(f"LR range test, batch {curve.batch_size}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
