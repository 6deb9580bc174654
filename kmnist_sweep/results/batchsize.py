"""The answer of a batch-size study: per power of two, does it fit, how fast, how good, at
which LR, and which size to pick.

    rows = size_rows(study, index, metric)
    pick = recommend(rows, metric)         # best metric; within its noise, the fastest
    figure = plot_sizes(rows, pick, metric)

The rule, written under the figure: take the best validation metric; every size whose
metric is within two standard errors of it (each metric's own rule, train/standard_error.py)
is as good; of those, recommend the one with the most images per second. Only a size that
trained at its own size and learned counts: one that was halved (out of memory, or a
diverging loss) has a smaller size's figures, one that did not learn (chance-level
validation accuracy) has no answer, and one that failed or was interrupted none either.
"""

from __future__ import annotations

from dataclasses import dataclass

import optuna
from matplotlib.figure import Figure
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

    @property
    def measured(self) -> bool:
        """Its figures are its own size's and it learned: it may be recommended."""
        return self.outcome == TRAINED

    @property
    def halved(self) -> bool:
        """It trained, at a smaller size than it asked for (one that fitted nowhere did not)."""
        return self.outcome == HALVED

    @property
    def fitted(self) -> bool:
        return self.outcome != NOT_FITTED


@dataclass(frozen=True)
class Recommendation:
    batch_size: int  # images per step
    trial: int  # the trial that measured it: best.yaml and `final` retrain this one
    value: float  # its metric
    images_per_s: float
    largest_trained: int  # largest size that trained at its own size and learned (0: none)
    noise: float  # the metric's standard error at the best value (0: no band)
    rule: str  # the rule in words, with its numbers


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
            )
        )
    return sorted(rows, key=lambda r: (r.requested, r.trial))


def recommend(
    rows: list[SizeRow], metric: str = "val/acc", maximize: bool = True
) -> Recommendation | None:
    """Best metric; among the sizes within two standard errors of it, the fastest. Only
    trials that trained at the size they asked for, and learned, count."""
    done = [r for r in rows if r.measured and r.value is not None and r.images_per_s]
    if not done:
        return None
    sign = 1.0 if maximize else -1.0
    best = max(done, key=lambda r: sign * float(r.value or 0.0))
    noise = best.noise or 0.0
    close = [
        r for r in done if sign * (float(best.value or 0.0) - float(r.value or 0.0)) <= 2 * noise
    ]
    pick = max(close, key=lambda r: float(r.images_per_s or 0.0))
    rule = f"best {best.value:.4f} at batch {best.requested}; " + (
        f"sizes within 2 standard errors ({2 * noise:.4f}, {RULES[metric]}) count as equally good"
        if metric in RULES and best.noise is not None
        else f"no noise band for {metric}: only the best counts"
    )
    rule += f"; of those, batch {pick.requested} trains fastest ({pick.images_per_s:.0f} images/s)"
    rule += _not_measured(rows)
    return Recommendation(
        batch_size=pick.requested,
        trial=pick.trial,
        value=float(pick.value or 0.0),
        images_per_s=float(pick.images_per_s or 0.0),
        largest_trained=max((r.requested for r in done), default=0),
        noise=noise,
        rule=rule,
    )


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
    unlearned = [r for r in rows if r.outcome == NOT_LEARNED and r.value is not None]
    if unlearned:
        ax.plot(
            [r.requested for r in unlearned],
            [float(r.value or 0.0) for r in unlearned],
            "v",
            color="tab:purple",
            ms=8,
            label="did not learn (chance level)",
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
        if pick.largest_trained:
            ax.axvline(
                pick.largest_trained,
                color="0.5",
                ls=":",
                label=f"largest that trained and learned: {pick.largest_trained}",
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


def size_answer(study: optuna.Study, metric: str) -> SizeAnswer | None:
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
    return SizeAnswer(rows, recommend(rows, metric, maximize), metric)


def answer_text(answer: SizeAnswer) -> str:
    """One line: the recommended size and the rule that picked it."""
    if answer.pick is None:
        shown = ", ".join(f"{r.requested} ({r.outcome})" for r in answer.rows)
        return f"no size trained at its own size and learned: nothing to recommend ({shown})"
    return f"Recommended: batch {answer.pick.batch_size}. {answer.pick.rule}"


def size_table(answer: SizeAnswer) -> list[list[str]]:
    """Header row, then one row per size: what the report prints under the figure."""
    header = ["batch", "trained at", answer.metric, "± SE", "images/s", "s/epoch", "peak MiB"]
    header.append("LR")
    return [header] + [
        [
            str(r.requested),
            _trained_at(r),
            _cell(r.value, ".4f"),
            _cell(r.noise, ".4f"),
            _cell(r.images_per_s, ".0f"),
            _cell(r.seconds_per_epoch, ".2f"),
            _cell(r.peak_mb, ".0f"),
            _cell(r.lr, ".3g"),
        ]
        for r in answer.rows
    ]


def _trained_at(row: SizeRow) -> str:
    if row.halved:
        return f"{row.effective} ({row.halved_by})"
    return str(row.effective) if row.measured else row.outcome


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
