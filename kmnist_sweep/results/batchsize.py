"""The answer of a batch-size study: per power of two, does it fit, how fast, how good, at
which LR, and which size to pick.

    rows = size_rows(study, metric)
    pick = recommend(rows, n_valid)        # best metric; within its noise, the fastest
    figure = plot_sizes(rows, pick, metric)

The rule, written under the figure: take the best validation metric; every size whose
metric is within two standard errors of it (the binomial noise of an accuracy measured on
`n_valid` images) is as good; of those, recommend the one with the most images per second.
A trial that was halved (out of memory, or a loss that did not fall) trained at a smaller
size than its own: its figures are that size's, so it is shown as halved and never counted
for the size it asked for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import optuna
from matplotlib.figure import Figure
from optuna.trial import TrialState

from kmnist_sweep import trial_attrs
from kmnist_sweep.config.search_space import parse_space


@dataclass(frozen=True)
class SizeRow:
    requested: int  # images per step the trial asked for
    effective: int  # images per step it trained at (after any halving)
    fitted: bool  # trained at some size (False: not even batch_size.min fitted)
    value: float | None  # the study's metric (None: pruned or failed before the end)
    images_per_s: float | None  # training images per second
    seconds_per_epoch: float | None
    peak_mb: float | None  # MiB
    lr: float | None  # peak LR per step the trial trained at
    halved_by: str | None = None  # why the first halving happened (oom, diverged); None: none

    @property
    def measured(self) -> bool:
        """Its figures are its own size's: it trained at the size it asked for."""
        return self.fitted and self.effective == self.requested

    @property
    def halved(self) -> bool:
        """It trained, at a smaller size than it asked for (one that fitted nowhere did not)."""
        return self.fitted and self.halved_by is not None


@dataclass(frozen=True)
class Recommendation:
    batch_size: int  # images per step
    value: float  # its metric
    images_per_s: float
    largest_fitted: int  # largest size that trained without halving
    noise: float  # the metric's standard error at the best value
    rule: str  # the rule in words, with its numbers


def size_rows(study: optuna.Study, index: int = 0) -> list[SizeRow]:
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
        rows.append(
            SizeRow(
                requested=requested,
                effective=effective or 0,
                fitted=bool(attrs.get(trial_attrs.BATCH_FITTED, True)),
                value=float(t.values[index]) if complete else None,
                images_per_s=attrs.get(trial_attrs.IMAGES_PER_S),
                seconds_per_epoch=attrs.get(trial_attrs.SECONDS_PER_EPOCH),
                peak_mb=attrs.get(trial_attrs.PEAK_MEMORY_MB),
                lr=attrs.get(trial_attrs.LR_VALUE),
                halved_by=str(halvings[0].get("cause", "?")) if halvings else None,
            )
        )
    return sorted(rows, key=lambda r: r.requested)


def recommend(rows: list[SizeRow], n_valid: int, maximize: bool = True) -> Recommendation | None:
    """Best metric; among the sizes within two standard errors of it, the fastest. Only
    trials that trained at the size they asked for count."""
    done = [r for r in rows if r.measured and r.value is not None and r.images_per_s]
    if not done:
        return None
    sign = 1.0 if maximize else -1.0
    best = max(done, key=lambda r: sign * float(r.value or 0.0))
    p = min(max(float(best.value or 0.0), 0.0), 1.0)
    noise = math.sqrt(p * (1 - p) / max(n_valid, 1))  # binomial standard error
    close = [
        r for r in done if sign * (float(best.value or 0.0) - float(r.value or 0.0)) <= 2 * noise
    ]
    pick = max(close, key=lambda r: float(r.images_per_s or 0.0))
    fitted = [r.requested for r in rows if r.measured]
    rule = (
        f"best {best.value:.4f} at batch {best.requested}; sizes within 2 standard errors "
        f"({2 * noise:.4f}, binomial on {n_valid} validation images) count as equally good; "
        f"of those, batch {pick.requested} trains fastest ({pick.images_per_s:.0f} images/s)"
    )
    halved = [f"{r.requested} ({r.halved_by} -> {r.effective})" for r in rows if r.halved]
    if halved:
        rule += f"; halved, so not measured at their own size: {', '.join(halved)}"
    return Recommendation(
        batch_size=pick.requested,
        value=float(pick.value or 0.0),
        images_per_s=float(pick.images_per_s or 0.0),
        largest_fitted=max(fitted, default=0),
        noise=noise,
        rule=rule,
    )


def plot_sizes(rows: list[SizeRow], pick: Recommendation | None, metric: str) -> Figure:
    """The metric and images/s against batch size (log2 axis labelled with real sizes)."""
    fig = Figure(figsize=(7, 4.6))
    ax = fig.add_subplot()
    sizes = [r.requested for r in rows]
    shown = [r for r in rows if r.measured and r.value is not None]
    values = [float(r.value or 0.0) for r in shown]
    ax.plot([r.requested for r in shown], values, "o-", color="tab:blue")
    halved = [r for r in rows if r.halved]
    if halved:  # at the foot of the axis: they have no figure of their own
        foot = min(values, default=0.0)
        ax.plot(
            [r.requested for r in halved],
            [foot] * len(halved),
            "x",
            color="tab:red",
            ms=9,
            label="halved: trained at a smaller size",
        )
        for r in halved:
            ax.annotate(
                f"{r.halved_by}\n-> {r.effective}",
                (r.requested, foot),
                textcoords="offset points",
                xytext=(0, 8),
                ha="center",
                fontsize=7,
                color="tab:red",
            )
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("batch size (images per step)")
    ax.set_ylabel(metric, color="tab:blue")
    speed = ax.twinx()
    fast = [r for r in rows if r.measured and r.images_per_s]
    rates = [float(r.images_per_s or 0.0) for r in fast]
    speed.plot([r.requested for r in fast], rates, "s--", color="tab:orange")
    speed.set_ylabel("training images/s", color="tab:orange")
    if pick is not None:
        ax.axvline(
            pick.batch_size, color="tab:green", lw=1.5, label=f"recommended: {pick.batch_size}"
        )
        if pick.largest_fitted:
            ax.axvline(
                pick.largest_fitted,
                color="0.5",
                ls=":",
                label=f"largest fitted: {pick.largest_fitted}",
            )
    if ax.get_legend_handles_labels()[0]:  # under the axes: the curves use all of them
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=8)
    ax.set_title("Batch size: accuracy and speed")
    fig.tight_layout()
    return fig


@dataclass(frozen=True)
class SizeAnswer:
    rows: list[SizeRow]
    pick: Recommendation | None
    metric: str


def size_answer(study: optuna.Study, metric: str, n_valid: int) -> SizeAnswer | None:
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
    rows = size_rows(study, index)
    maximize = study.directions[index] == optuna.study.StudyDirection.MAXIMIZE
    return SizeAnswer(rows, recommend(rows, n_valid, maximize), metric)


def answer_text(answer: SizeAnswer) -> str:
    """One line: the recommended size and the rule that picked it."""
    if answer.pick is None:
        return "no size completed at the size it asked for: nothing to recommend"
    return f"Recommended: batch {answer.pick.batch_size}. {answer.pick.rule}"


def size_table(answer: SizeAnswer) -> list[list[str]]:
    """Header row, then one row per size: what the report prints under the figure."""
    header = ["batch", "trained at", answer.metric, "images/s", "s/epoch", "peak MiB", "LR"]
    return [header] + [
        [
            str(r.requested),
            _trained_at(r),
            _cell(r.value, ".4f"),
            _cell(r.images_per_s, ".0f"),
            _cell(r.seconds_per_epoch, ".2f"),
            _cell(r.peak_mb, ".0f"),
            _cell(r.lr, ".3g"),
        ]
        for r in answer.rows
    ]


def _trained_at(row: SizeRow) -> str:
    if not row.fitted:
        return "did not fit"
    return f"{row.effective} ({row.halved_by})" if row.halved else str(row.effective)


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
