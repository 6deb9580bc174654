"""sweeps/<study>/: trials.csv, best.yaml (the best trial as Hydra overrides; for a
multi-objective study the Pareto front's trials) and the sweep summary, all derived from
the study, so any of them can be written again.
"""

from __future__ import annotations

import csv
import io
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.trial import FrozenTrial, TrialState

from kmnist_sweep.config.search_space import (
    format_override_value,
    to_overrides,
)
from kmnist_sweep.errors import ConfigError
from kmnist_sweep.files import write_atomic
from kmnist_sweep.masking import mask_url
from kmnist_sweep.results.batchsize import recommended_trial
from kmnist_sweep.results.pareto import is_multi_objective, metric_names, pareto_front

BATCH = "trainer.batch_size"


@dataclass(frozen=True)
class SweepSummary:
    """What a run left in the study."""

    study_name: str
    storage: str  # URL with any password masked
    n_trials: int  # the study's target total of finished trials
    complete: int
    pruned: int
    failed: int
    best_value: float | None
    best_trial: int | None  # trial number
    best_params: dict[str, Any] = field(default_factory=dict)  # dotted config key -> value
    output_dir: Path = Path(".")
    metrics: list[str] = field(default_factory=list)  # the study's metric names, in order
    # Multi-objective: (trial number, values) of each Pareto-front trial; best_* are None.
    front: list[tuple[int, list[float]]] = field(default_factory=list)
    # A budgeted sweep: what it planned and did, the final fit and the bundle (lines).
    budget: list[str] = field(default_factory=list)
    batch_size: int | None = None  # a batch-size study: the recommended size (best_* its trial)


def summarize(
    study: optuna.Study,
    cfg: DictConfig,
    n_trials: int,
    storage: str,
    out_dir: Path,
    chosen: int | None = None,
) -> SweepSummary:
    trials = study.get_trials(deepcopy=False)
    recommended = _recommended(study, cfg) if chosen is None else None
    best = study.trials[chosen] if chosen is not None else recommended or _best_trial(study)
    front = pareto_front(study)
    return SweepSummary(
        study_name=study.study_name,
        storage=storage,
        n_trials=n_trials,
        complete=sum(t.state == TrialState.COMPLETE for t in trials),
        pruned=sum(t.state == TrialState.PRUNED for t in trials),
        failed=sum(t.state == TrialState.FAIL for t in trials),
        best_value=None if best is None else best.value,
        best_trial=None if best is None else best.number,
        best_params={} if best is None else trial_values(best),
        output_dir=out_dir,
        metrics=metric_names(study),
        front=[(t.number, list(t.values)) for t in front],
        batch_size=None if recommended is None else trial_values(recommended).get(BATCH),
    )


def _recommended(study: optuna.Study, cfg: DictConfig) -> FrozenTrial | None:
    """A batch-size study's recommended trial: its one answer, in best.yaml and the summary."""
    target = cfg.batch_size.target
    return recommended_trial(study, str(cfg.study.metric), target)


def _best_trial(study: optuna.Study) -> FrozenTrial | None:
    if is_multi_objective(study):
        return None  # several objectives have a front, not one best trial
    try:
        return study.best_trial
    except ValueError:
        return None


def trial_values(t: FrozenTrial) -> dict[str, Any]:
    """The config values a trial ran with: from the `overrides` the objective recorded
    (exact, e.g. the LR an lr_finder factor led to), else decoded from its params."""
    recorded = t.user_attrs.get("overrides")
    if recorded:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parsed = OverridesParser.create().parse_overrides(list(recorded))
        return {o.key_or_group: o.value() for o in parsed}
    values: dict[str, Any] = {}
    for name, value in t.params.items():
        if name.endswith(".log2"):
            values[name.removesuffix(".log2")] = 2 ** int(value)
        else:
            values[name] = value
    return values


# Top-level sections that are not part of a trial's recipe: a retrain trains once, as the
# user runs it (no study, launcher, or test switches such as an injected out-of-memory).
NOT_RECIPE = ("study", "search_space", "hydra", "launcher", "debug")


def hydra_base_overrides(cfg: DictConfig) -> list[str]:
    """Overrides that rebuild this config without the sweep: the command line's own, plus
    every value the sweep file set outside study/search_space (e.g. trainer.epochs=3)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
    except (ImportError, ValueError):
        return []
    task = [o for o in hydra_cfg.overrides.task if not _is_sweep_override(o)]
    try:
        from hydra import compose

        reference = compose(config_name=str(hydra_cfg.job.config_name), overrides=task)
    except Exception:  # no global Hydra (compose outside an app): keep what we know
        return task
    return task + [
        f"{key}={format_override_value(value)}" for key, value in _leaf_diff(reference, cfg)
    ]


def _is_sweep_override(override: str) -> bool:
    key = override.lstrip("+~").split("=", 1)[0]
    return key == "sweep" or key.split(".")[0] in NOT_RECIPE


def _leaf_diff(reference: DictConfig, cfg: DictConfig) -> list[tuple[str, Any]]:
    """(dotted key, value) where cfg differs from reference, interpolations unresolved."""
    ref = cast(dict[str, Any], OmegaConf.to_container(reference, resolve=False))
    new = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=False))
    out: list[tuple[str, Any]] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        for key, value in b.items():
            name = f"{prefix}{key}"
            if not prefix and key in NOT_RECIPE:
                continue
            if isinstance(value, dict) and isinstance(a.get(key), dict):
                walk(a[key], value, f"{name}.")
            elif key not in a or a[key] != value:
                out.append((name, value))

    walk(ref, new, "")
    return out


def write_results(
    study: optuna.Study,
    cfg: DictConfig,
    out_dir: Path,
    base_overrides: list[str],
    chosen: int | None = None,
) -> None:
    """trials.csv and best.yaml: the trial `chosen` (a budgeted sweep's answer), else the
    best trial, else the Pareto front."""
    trials = study.get_trials(deepcopy=False)
    multi = is_multi_objective(study)
    names = metric_names(study) if multi else None
    write_atomic(out_dir / "trials.csv", trials_csv(trials, names))
    if chosen is None and remove_stale_best(study, out_dir):
        return
    if multi:
        front = pareto_front(study)
        write_atomic(out_dir / "best.yaml", front_yaml(study, cfg, front, base_overrides))
        return
    recommended = _recommended(study, cfg) if chosen is None else None
    best = study.trials[chosen] if chosen is not None else recommended or _best_trial(study)
    if best is None:
        return
    body = best_yaml(study, cfg, best, base_overrides, recommended is not None)
    write_atomic(out_dir / "best.yaml", body)


def remove_stale_best(study: optuna.Study, out_dir: Path) -> bool:
    """Remove best.yaml when the study has no complete trial (True): the file would be an
    earlier study's under the same name, and `final` would train its trial on this config."""
    if pareto_front(study) if is_multi_objective(study) else _best_trial(study):
        return False
    (out_dir / "best.yaml").unlink(missing_ok=True)
    return True


def trials_csv(trials: Sequence[FrozenTrial], metrics: Sequence[str] | None = None) -> str:
    """One row per trial: number, state, value, duration, params, user attributes. With the
    `metrics` of a multi-objective study, one `values_<metric>` column per metric (as
    Optuna's trials_dataframe names them) instead of `value`."""
    rows = []
    for t in trials:
        row: dict[str, Any] = {"number": t.number, "state": t.state.name}
        if metrics is None:
            row["value"] = t.value
        else:
            values = t.values or [None] * len(metrics)
            row.update({f"values_{m}": v for m, v in zip(metrics, values, strict=True)})
        row |= {
            "duration_s": None if t.duration is None else round(t.duration.total_seconds(), 3),
            "epochs_reported": len(t.intermediate_values),
            "retry_of": t.system_attrs.get("failed_trial"),
        }
        row.update(trial_values(t))
        for key, value in t.user_attrs.items():
            if key == "overrides":
                row[key] = " ".join(value)
            elif isinstance(value, dict):
                row.update({k if "/" in k else f"{key}.{k}": v for k, v in value.items()})
            else:
                row[key] = value
        rows.append(row)
    columns = list(dict.fromkeys(key for row in rows for key in row)) or ["number", "state"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def retrain(t: FrozenTrial, base_overrides: Sequence[str]) -> tuple[list[str], str]:
    """The overrides that retrain trial `t` (the command line's, then the trial's own) and
    the `python -m kmnist_sweep ...` command they make."""
    trial_overrides = list(t.user_attrs.get("overrides") or to_overrides(trial_values(t)))
    searched = {o.split("=", 1)[0] for o in trial_overrides}
    overrides = [o for o in base_overrides if o.lstrip("+~").split("=", 1)[0] not in searched]
    overrides += trial_overrides
    return overrides, "python -m kmnist_sweep " + " ".join(shlex.quote(o) for o in overrides)


def best_yaml(
    study: optuna.Study,
    cfg: DictConfig,
    best: FrozenTrial,
    base_overrides: Sequence[str],
    recommended: bool = False,
) -> str:
    values = trial_values(best)
    overrides, command = retrain(best, base_overrides)
    body = {
        "study": study.study_name,
        "storage": mask_url(str(cfg.study.storage)),
        "metric": str(cfg.study.metric),
        "direction": str(cfg.study.direction),
        "value": best.value,
        "trial": best.number,
        "params": values,
        "overrides": overrides,
    }
    what = "Recommended batch size" if recommended else "Best trial"
    header = f"# {what} of study {study.study_name}. Retrain it with:\n#   {command}\n"
    return header + OmegaConf.to_yaml(OmegaConf.create(body))


def front_yaml(
    study: optuna.Study,
    cfg: DictConfig,
    front: Sequence[FrozenTrial],
    base_overrides: Sequence[str],
) -> str:
    """best.yaml of a multi-objective study: every Pareto-front trial, each with its values,
    params, overrides and the command that retrains it."""
    names = metric_names(study)
    trials = []
    for t in front:
        overrides, command = retrain(t, base_overrides)
        trials.append(
            {
                "trial": t.number,
                "values": dict(zip(names, t.values, strict=True)),
                "params": trial_values(t),
                "overrides": overrides,
                "command": command,
            }
        )
    body = {
        "study": study.study_name,
        "storage": mask_url(str(cfg.study.storage)),
        "metrics": names,
        "directions": [d.name.lower() for d in study.directions],
        "pareto_front": trials,
    }
    header = (
        f"# Pareto front of study {study.study_name}: {len(front)} trial(s), none beaten in "
        f"every metric ({', '.join(names)}) by another.\n# Retrain one with its `command`.\n"
    )
    return header + OmegaConf.to_yaml(OmegaConf.create(body))


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    try:
        return cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
    except Exception as exc:
        raise ConfigError(f"the config does not resolve: {str(exc).splitlines()[0]}") from None
