"""The batch-size figure: the report's first, and docs/img/batchsize_kmnist_sample.png.

    fig = plot_sizes(answer)      # answer = results.batchsize.size_answer(study, metric)

Top: optimiser steps and seconds of training to the common target against batch size,
with the gradient noise scale (the sweep's, and the range over sizes) and the
recommended size. Bottom: the metric at each size's budget and its training speed, with
the sizes that have no figures of their own (halved, did not learn) marked.
"""

from __future__ import annotations

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from kmnist_sweep.results.batchsize import NOT_LEARNED, SizeAnswer, SizeRow

STEPS_TITLE = "Steps and seconds to the target"
BUDGET_TITLE = "Accuracy at the budget and speed"
SPEED_AXES = "images/s"  # the label of the speed axes, which share the bottom panel's x


def plot_sizes(answer: SizeAnswer) -> Figure:
    fig = Figure(figsize=(7.5, 8.2))
    top, bottom = fig.subplots(2, 1)
    _steps_panel(top, answer)
    _budget_panel(bottom, answer)
    for ax in (top, bottom):
        _size_axis(ax, [r.requested for r in answer.rows])
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2, fontsize=8)
    fig.tight_layout()
    return fig


def _size_axis(ax: Axes, sizes: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("batch size (images per step)")


def _steps_panel(ax: Axes, answer: SizeAnswer) -> None:
    pick = answer.pick
    ax.set_title(STEPS_TITLE if pick is None else f"{STEPS_TITLE}: {pick.target:.4f}")
    if pick is None:
        return
    timed = [(r, pick.reach.get(r.trial)) for r in answer.rows if r.trial in pick.reach]
    got = [(r.requested, g) for r, g in timed if g is not None]
    ax.plot([s for s, _ in got], [g.steps for _, g in got], "o-", color="tab:blue")
    ax.set_yscale("log")
    ax.set_ylabel("optimiser steps to target", color="tab:blue")
    seconds = ax.twinx()
    seconds.plot([s for s, _ in got], [g.seconds for _, g in got], "s--", color="tab:orange")
    seconds.set_ylabel("seconds of training to target", color="tab:orange")
    missed = [r.requested for r, g in timed if g is None]
    if missed and got:
        top = max(g.steps for _, g in got)
        ax.plot(missed, [top] * len(missed), "x", color="tab:red", ms=9, label="not reached")
    scales = [r.noise_scale for r in answer.rows if r.measured and r.noise_scale is not None]
    if pick.noise_scale is not None:
        ax.axvspan(min(scales), max(scales), color="0.85", zorder=0, label="noise scale range")
        ax.axvline(
            pick.noise_scale,
            color="0.3",
            ls="--",
            label=f"gradient noise scale: {pick.noise_scale:.0f}",
        )
    if pick.knee is not None:
        ax.axvline(pick.knee, color="tab:purple", ls=":", label=f"knee: {pick.knee}")
    ax.axvline(pick.batch_size, color="tab:green", lw=1.5, label=f"recommended: {pick.batch_size}")


def _budget_panel(ax: Axes, answer: SizeAnswer) -> None:
    rows, pick = answer.rows, answer.pick
    ax.set_title(BUDGET_TITLE)
    shown = [r for r in rows if r.measured and r.value is not None]
    values = [float(r.value or 0.0) for r in shown]
    ax.plot([r.requested for r in shown], values, "o-", color="tab:blue")
    ax.set_ylabel(f"{answer.metric} at the budget", color="tab:blue")
    _mark_halved(ax, [r for r in rows if r.halved], min(values, default=0.0))
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
    speed = ax.twinx()
    speed.set_label(SPEED_AXES)
    fast = [r for r in rows if r.measured and r.images_per_s]
    rates = [float(r.images_per_s or 0.0) for r in fast]
    speed.plot([r.requested for r in fast], rates, "s--", color="tab:orange")
    speed.set_ylabel("training images/s", color="tab:orange")
    if pick is not None:
        ax.axvline(pick.batch_size, color="tab:green", lw=1.5)
        if pick.largest_trained:
            ax.axvline(
                pick.largest_trained,
                color="0.5",
                ls=":",
                label=f"largest that trained and learned: {pick.largest_trained}",
            )


def _mark_halved(ax: Axes, halved: list[SizeRow], foot: float) -> None:
    """At the foot of the axis: a halved size has no figure of its own."""
    if not halved:
        return
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
