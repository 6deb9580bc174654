"""A budgeted sweep's figure: every trial as a bar over wall time, one row per trial,
coloured by rung, the final fit after them and the budget as a line.

    plot_budget(spans, rungs=[3, 10], budget_s=900, final=(700.0, 880.0), spent_before=0,
                path=out_dir / "report/budget.png")
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.artist import Artist  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from kmnist_sweep.files import write_atomic  # noqa: E402

BUDGET_FIGURE = "budget.png"  # under the study's report/ folder
COLOURS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52")  # rung 0, 1, 2, ...


@dataclass(frozen=True)
class TrialSpan:
    number: int
    rung: int
    start_s: float  # seconds into the budget
    end_s: float
    state: str  # complete | pruned | fail


def plot_budget(
    spans: Sequence[TrialSpan],
    rungs: Sequence[int],
    budget_s: float,
    final: tuple[float, float],
    spent_before: float,
    path: Path,
    ended_s: float | None = None,
) -> Path:
    """Draw the figure to `path` (PNG); returns it. `ended_s`: when the command ended."""
    fig, ax = plt.subplots(figsize=(9, max(3.0, 1.2 + 0.28 * (len(spans) + 1))), dpi=110)
    handles: list[Artist] = []
    if spent_before > 0:
        handles.append(ax.axvspan(0, spent_before, color="0.92", label="earlier runs"))
    for row, s in enumerate(sorted(spans, key=lambda s: s.number)):
        colour = COLOURS[min(s.rung, len(COLOURS) - 1)]
        hatch = None if s.state == "complete" else "//"
        ax.barh(row, s.end_s - s.start_s, left=s.start_s, color=colour, hatch=hatch, height=0.7)
        ax.text(s.end_s, row, f" #{s.number}", va="center", fontsize=7)
    final_row = len(spans)
    ax.barh(final_row, final[1] - final[0], left=final[0], color="0.3", height=0.7)
    ax.text(final[1], final_row, " final fit", va="center", fontsize=7)
    for r, epochs in enumerate(rungs):
        colour = COLOURS[min(r, len(COLOURS) - 1)]
        handles.append(Patch(color=colour, label=f"rung {r}: {epochs} epochs"))
    handles.append(Patch(color="0.3", label="final fit: train + valid, test once"))
    label = f"budget ({budget_s:.0f} s)"
    handles.append(ax.axvline(budget_s, color="red", linestyle="--", label=label))
    if ended_s is not None:
        label = f"command ended ({ended_s:.0f} s)"
        handles.append(ax.axvline(ended_s, color="0.2", linestyle=":", label=label))
    ax.set_xlim(0, max(budget_s, final[1], ended_s or 0.0) * 1.08)
    ax.set_ylim(final_row + 0.8, -0.8)
    ax.set_yticks([])
    ax.set_xlabel("wall time since the command started (s)")
    ax.set_title("Trials over wall time by rung (hatched: not complete), final fit, budget")
    ax.legend(handles=handles, loc="lower left", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    return path
