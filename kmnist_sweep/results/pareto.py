"""Studies of several objectives (study.directions, study.metrics): the Pareto front, its
figure and table, and what stands in for "the best trial" when there is none.

    front = pareto_front(study)      # complete trials no other trial beats in every metric
    figure = plot_front(study)       # Optuna's plot, its axes named by the metrics
    table = front_table(study)       # header row, then one row per front trial

A study of one objective has no front: these return [] or {} for it, so callers need not
ask first.
"""

from __future__ import annotations

from typing import Any

import optuna
from matplotlib.figure import Figure
from optuna.trial import FrozenTrial, TrialState

from kmnist_sweep import trial_attrs
from kmnist_sweep.results.confusion import SkipPlot


def is_multi_objective(study: optuna.Study) -> bool:
    return len(study.directions) > 1


def metric_names(study: optuna.Study) -> list[str]:
    """The name of each of the study's values: the metrics the runner named them by
    (sweep/study.py), else Optuna's defaults."""
    names = study.metric_names
    if names:
        return list(names)
    n = len(study.directions)
    return ["Objective Value"] if n == 1 else [f"Objective {i}" for i in range(n)]


def pareto_front(study: optuna.Study) -> list[FrozenTrial]:
    """The complete trials no other trial beats in every metric, by number."""
    if not is_multi_objective(study):
        return []
    return sorted(study.best_trials, key=lambda t: t.number)


def plot_front(study: optuna.Study) -> Figure:
    """Every complete trial in the space of the metrics, the front highlighted."""
    n = len(study.directions)
    if n > 3:
        raise SkipPlot(f"skipped: Optuna draws fronts of 2 or 3 metrics, this study has {n}")
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise SkipPlot("skipped: no complete trial yet")
    from optuna.visualization import matplotlib as ovm

    axes = ovm.plot_pareto_front(study, target_names=metric_names(study))
    figure = axes.get_figure()
    assert isinstance(figure, Figure)
    return figure


def front_table(study: optuna.Study) -> list[list[str]]:
    """Header row, then one row per front trial: its values (4 decimals), its overrides."""
    names = metric_names(study)
    rows = [["trial", *names, "overrides"]]
    for t in pareto_front(study):
        overrides = trial_attrs.overrides_of(t.user_attrs)
        shown = overrides or [f"{k}={v}" for k, v in t.params.items()]
        rows.append([f"#{t.number}", *(f"{v:.4f}" for v in t.values), " ".join(shown)])
    return rows


def front_rows(study: optuna.Study) -> list[tuple[str, str]]:
    """The report's summary rows for a multi-objective study (none for one objective)."""
    if not is_multi_objective(study):
        return []
    pairs = zip(metric_names(study), study.directions, strict=True)
    front = pareto_front(study)
    numbers = ", ".join(f"#{t.number}" for t in front)
    return [
        ("objectives", ", ".join(f"{m} ({d.name.lower()})" for m, d in pairs)),
        ("Pareto front", f"{len(front)} trial(s): {numbers}" if front else "none yet"),
    ]


def shown_trial(study: optuna.Study) -> FrozenTrial | None:
    """The trial whose validation predictions the report shows: the best trial, or of a
    multi-objective study the front's best in the first metric; None before any completes."""
    if not is_multi_objective(study):
        try:
            return study.best_trial
        except ValueError:
            return None
    front = pareto_front(study)
    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    pick = max if maximize else min
    return pick(front, key=lambda t: t.values[0]) if front else None


def front_summary(study: optuna.Study) -> dict[str, Any]:
    """What wandb's study summary adds for a multi-objective study."""
    if not is_multi_objective(study):
        return {}
    front = pareto_front(study)
    return {"pareto/size": len(front), "pareto/trials": [t.number for t in front]}
