"""The answer of a batch-size study: per power of two, did it train, how fast, how good, at
which LR, how soon it reaches a common target, and which size to pick.

    answer = size_answer(study, metric, target)   # rows, the pick, the target
    answer_text(answer)                           # the recommendation and its rule

The rule, printed under the answer: every size is timed to one target, `batch_size.target`
or else the best final validation metric less two of its standard errors (each metric's
own rule, train/standard_error.py); the recommended size is the one that first reaches it,
in seconds of training (validation excluded), at the end of an epoch. Only a size that
trained at its own size and learned counts: one that was halved (out of memory, or a
diverging loss) has a smaller size's figures, one that did not learn (chance-level
validation accuracy) has no answer, and one that failed or was interrupted none either.
The gradient noise scale (train/noise_scale.py) is given per size and for the sweep; the
knee of steps-to-target is the first size whose doubling saves less than a quarter of the
steps, where the model S = S_min (1 + B_noise / B) puts B = B_noise.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from kmnist_sweep import trial_attrs
from kmnist_sweep.config.search_space import parse_space
from kmnist_sweep.train.standard_error import RULES

TRAINED = "trained"  # completed at the size it asked for, and learned
NOT_LEARNED = "did not learn"  # completed at its own size, no better than chance
HALVED = "halved"  # trained at a smaller size (out of memory or diverged)
NOT_FITTED = "did not fit"  # out of memory or diverged down to batch_size.min


@dataclass(frozen=True)
class SizeRow:
    requested: int  # images per step the trial asked for
    effective: int  # images per step it trained at (after any halving)
    outcome: str  # TRAINED, NOT_LEARNED, HALVED, NOT_FITTED, pruned, interrupted, failed
    value: float | None  # the study's metric (None: pruned or failed before the end)
    images_per_s: float | None  # training images per second
    seconds_per_epoch: float | None
    peak_mb: float | None  # MiB
    lr: float | None  # peak LR per step the trial trained at
    halved_by: str | None = None  # why the first halving happened (oom, diverged); None: none
    trial: int = -1  # the trial's number
    noise: float | None = None  # the metric's standard error (None: no rule, not recorded)
    cause: str = ""  # why it did not fit or did not learn, one line
    curve: list[dict[str, float]] = field(default_factory=list)  # per epoch (CURVE)
    noise_scale: float | None = None  # B_simple in images, over its last epochs

    @property
    def measured(self) -> bool:
        """Its figures are its own size's and it learned: it may be recommended."""
        return self.outcome == TRAINED

    @property
    def halved(self) -> bool:
        """It trained, at a smaller size than it asked for (one that fitted nowhere did not)."""
        return self.outcome == HALVED

    @property
    def epochs(self) -> int | None:
        return int(self.curve[-1]["epoch"]) if self.curve else None


@dataclass(frozen=True)
class Reach:
    """Where a size's validation curve first reached the target (at an epoch's end)."""

    epoch: int
    steps: int  # optimiser steps so far
    seconds: float  # seconds of training so far (validation excluded)


@dataclass(frozen=True)
class Recommendation:
    batch_size: int  # images per step
    trial: int  # the trial that measured it: best.yaml and `final` retrain this one
    value: float  # its metric at the end of its budget
    images_per_s: float
    largest_trained: int  # largest size that trained at its own size and learned (0: none)
    noise: float  # the metric's standard error at the best value (0: no band)
    rule: str  # the rule in words, with its numbers
    target: float = 0.0  # the metric value every size is timed to
    reach: dict[int, Reach | None] = field(default_factory=dict)  # trial -> where it got there
    noise_scale: float | None = None  # the sweep's B_simple: median over the sizes that count
    knee: int | None = None  # first size whose doubling saves < 1/4 of the steps to target


def outcome(t: FrozenTrial, requested: int, effective: int) -> tuple[str, str]:
    """What became of a batch-size trial, and the cause where it did not train (one line)."""
    attrs = t.user_attrs
    halvings = attrs.get(trial_attrs.BATCH_HALVINGS) or []
    if not attrs.get(trial_attrs.BATCH_FITTED, True):
        reason = str(attrs.get(trial_attrs.REASON, ""))
        return f"{NOT_FITTED} ({reason.split(' ', 1)[0] or '?'})", reason
    if halvings and effective != requested and t.state != TrialState.FAIL:
        return HALVED, str(halvings[0].get("detail", ""))
    if t.state == TrialState.COMPLETE and t.values is not None:
        if trial_attrs.DID_NOT_LEARN in attrs:
            return NOT_LEARNED, str(attrs[trial_attrs.DID_NOT_LEARN])
        return TRAINED, ""
    if t.state == TrialState.PRUNED:
        return "pruned", str(attrs.get(trial_attrs.REASON, ""))
    if trial_attrs.INTERRUPTED in attrs:
        return "interrupted", str(attrs[trial_attrs.INTERRUPTED])
    return "failed", str(attrs.get(trial_attrs.ERROR, ""))


def size_rows(study: optuna.Study, index: int = 0, metric: str = "") -> list[SizeRow]:
    """One row per batch-size trial that ended (complete, pruned or failed), by size; its
    value is the trial's `index`-th (the metric's, in a multi-objective study)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if not t.state.is_finished():
            continue
        attrs = t.user_attrs
        requested, effective = trial_attrs.batch_sizes(attrs)
        if requested is None:
            continue
        complete = t.state == TrialState.COMPLETE and t.values is not None
        halvings = attrs.get(trial_attrs.BATCH_HALVINGS) or []
        what, cause = outcome(t, requested, effective or 0)
        rows.append(
            SizeRow(
                requested=requested,
                effective=effective or 0,
                outcome=what,
                value=float(t.values[index]) if complete else None,
                images_per_s=attrs.get(trial_attrs.IMAGES_PER_S),
                seconds_per_epoch=attrs.get(trial_attrs.SECONDS_PER_EPOCH),
                peak_mb=attrs.get(trial_attrs.PEAK_MEMORY_MB),
                lr=attrs.get(trial_attrs.LR_VALUE),
                halved_by=str(halvings[0].get("cause", "?")) if halvings else None,
                trial=t.number,
                noise=trial_attrs.standard_error(attrs, metric),
                cause=cause,
                curve=list(attrs.get(trial_attrs.CURVE) or []),
                noise_scale=_noise_scale(attrs),
            )
        )
    return sorted(rows, key=lambda r: (r.requested, r.trial))


def _noise_scale(attrs: dict[str, Any]) -> float | None:
    """A trial's noise scale: the median of its last two epochs' defined values, the rule of
    train/noise_scale.summarise (not imported: it brings fastai, which a CLI answering bad
    input, through outputs.py, must not load)."""
    values = attrs.get(trial_attrs.NOISE_SCALE) or []
    tail = [float(v) for v in values[-2:] if v is not None and math.isfinite(v) and v > 0]
    return statistics.median(tail) if tail else None


def time_to(row: SizeRow, metric: str, target: float, maximize: bool) -> Reach | None:
    """The first epoch's end at which `row`'s validation `metric` reached `target`."""
    sign = 1.0 if maximize else -1.0
    for point in row.curve:
        value = point.get(metric)
        if value is not None and sign * (value - target) >= -1e-12:
            return Reach(int(point["epoch"]), int(point["steps"]), float(point["seconds"]))
    return None


def recommend(
    rows: list[SizeRow],
    metric: str = "val/acc",
    maximize: bool = True,
    target: float | None = None,
) -> Recommendation | None:
    """The size that reaches the target first in seconds of training, of those that trained
    at the size they asked for and learned (the module's doc has the rule)."""
    done = [r for r in rows if r.measured and r.value is not None]
    if not done:
        return None
    sign = 1.0 if maximize else -1.0
    best = max(done, key=lambda r: sign * float(r.value or 0.0))
    banded = best.noise is not None and metric in RULES
    noise = float(best.noise or 0.0) if banded else 0.0
    if target is None:
        target = float(best.value or 0.0) - sign * 2 * noise
        source = f"the best final value, {best.value:.4f} at batch {best.requested}, " + (
            f"less 2 standard errors ({2 * noise:.4f}, {RULES[metric]})"
            if banded
            else f"itself (no noise band for {metric})"
        )
    else:
        source = "batch_size.target"
    reach = {r.trial: time_to(r, metric, target, maximize) for r in done}
    reached = [r for r in done if reach[r.trial] is not None]
    sense = ">=" if maximize else "<="
    rule = f"target {metric} {sense} {target:.4f} ({source})"
    if not reached:
        return None
    pick = min(reached, key=lambda r: (_seconds(reach[r.trial]), r.requested))
    first = reach[pick.trial]
    assert first is not None
    rule += (
        f"; batch {pick.requested} reaches it first: {first.seconds:.1f} s of training "
        f"({first.steps} steps, epoch {first.epoch} of {pick.epochs})"
    )
    missed = [
        f"{r.requested} ({r.value:.4f} after {r.curve[-1]['steps']:.0f} steps)"
        for r in done
        if reach[r.trial] is None and r.curve
    ]
    if missed:
        rule += f"; not reached within their budget: {', '.join(missed)}"
    scales = [r.noise_scale for r in done if r.noise_scale is not None]
    return Recommendation(
        batch_size=pick.requested,
        trial=pick.trial,
        value=float(pick.value or 0.0),
        images_per_s=float(pick.images_per_s or 0.0),
        largest_trained=max((r.requested for r in done), default=0),
        noise=noise,
        rule=rule + _not_measured(rows),
        target=target,
        reach=reach,
        noise_scale=statistics.median(scales) if scales else None,
        knee=knee(done, reach),
    )


def _seconds(reach: Reach | None) -> float:
    return float("inf") if reach is None else reach.seconds


def knee(rows: list[SizeRow], reach: dict[int, Reach | None]) -> int | None:
    """The first size whose doubling cuts the steps to the target by less than a quarter."""
    steps = {r.requested: reach[r.trial] for r in rows}
    for size in sorted(steps):
        here, there = steps[size], steps.get(2 * size)
        if here is not None and there is not None and there.steps > 0.75 * here.steps:
            return size
    return None


def _not_measured(rows: list[SizeRow]) -> str:
    """The sizes that have no answer of their own, and why, for the end of the rule."""
    text = ""
    halved = [f"{r.requested} ({r.halved_by} -> {r.effective})" for r in rows if r.halved]
    if halved:
        text += f"; halved, so not measured at their own size: {', '.join(halved)}"
    others = [f"{r.requested} ({r.outcome})" for r in rows if not r.measured and not r.halved]
    if others:
        text += f"; not counted: {', '.join(others)}"
    return text


@dataclass(frozen=True)
class SizeAnswer:
    rows: list[SizeRow]
    pick: Recommendation | None
    metric: str
    target: float | None = None  # batch_size.target as set (None: from the best size)


def size_answer(
    study: optuna.Study, metric: str, target: float | None = None
) -> SizeAnswer | None:
    """The batch-size answer when the study searches the batch size and nothing else."""
    space = study.user_attrs.get(trial_attrs.STUDY_SEARCH_SPACE) or {}
    searched = [p.name for p in parse_space(space) if p.searched]
    if searched != ["trainer.batch_size"]:
        return None
    # A multi-objective study (e.g. [val/acc, speed/train_s]) answers with `metric`'s values;
    # one that does not optimise `metric` has no answer to give.
    names = study.metric_names or []
    if len(study.directions) > 1 and metric not in names:
        return None
    index = names.index(metric) if metric in names else 0
    rows = size_rows(study, index, metric)
    maximize = study.directions[index] == optuna.study.StudyDirection.MAXIMIZE
    return SizeAnswer(rows, recommend(rows, metric, maximize, target), metric, target)


def recommended_trial(study: optuna.Study, metric: str, target: Any = None) -> FrozenTrial | None:
    """The trial of the recommended size; None where the study has no batch-size answer."""
    answer = size_answer(study, metric, None if target is None else float(target))
    if answer is None or answer.pick is None:
        return None
    return next(t for t in study.get_trials(deepcopy=False) if t.number == answer.pick.trial)


def answer_text(answer: SizeAnswer) -> str:
    """The recommended size and, after it, the rule that picked it."""
    if answer.pick is None:
        shown = ", ".join(f"{r.requested} ({r.outcome})" for r in answer.rows)
        if any(r.measured for r in answer.rows):
            why = f"no size reached batch_size.target={answer.target}"
        else:
            why = "no size trained at its own size and learned"
        return f"Recommended batch size: none; {why} ({shown})"
    pick = answer.pick
    text = f"Recommended batch size: {pick.batch_size}. Rule: {pick.rule}"
    if pick.noise_scale is not None:
        text += f". Gradient noise scale: {pick.noise_scale:.0f} images (median over sizes)"
    if pick.knee is not None:
        text += f"; knee of steps to target: batch {pick.knee}"
    return text


def size_table(answer: SizeAnswer) -> list[list[str]]:
    """Header row, then one row per size: what the report prints under the figure."""
    header = ["batch", "trained at", "epochs", "LR", f"{answer.metric} at budget", "± SE"]
    header += ["steps to target", "s to target", "images/s", "peak MiB", "noise scale"]
    reach = answer.pick.reach if answer.pick is not None else {}
    table = [header]
    for r in answer.rows:
        got = reach.get(r.trial)
        table.append(
            [
                str(r.requested),
                _trained_at(r),
                "-" if r.epochs is None else str(r.epochs),
                _cell(r.lr, ".3g"),
                _cell(r.value, ".4f"),
                _cell(r.noise, ".4f"),
                _cell(None if got is None else got.steps, "d", r.trial in reach),
                _cell(None if got is None else got.seconds, ".1f", r.trial in reach),
                _cell(r.images_per_s, ".0f"),
                _cell(r.peak_mb, ".0f"),
                _cell(r.noise_scale, ".0f"),
            ]
        )
    return table


def table_text(answer: SizeAnswer) -> str:
    """The table as aligned plain text, for the end of a sweep's output."""
    table = size_table(answer)
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join(
        "  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True))
        for row in table
    )


def _trained_at(row: SizeRow) -> str:
    if row.halved:
        return f"{row.effective} ({row.halved_by})"
    return str(row.effective) if row.measured else row.outcome


def _cell(value: float | None, spec: str, timed: bool = False) -> str:
    if value is None:
        return "not reached" if timed else "-"
    return format(value, spec)
