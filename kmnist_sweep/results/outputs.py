"""sweeps/<study>/: trials.csv, best.yaml (the best trial as Hydra overrides) and the
sweep summary, all derived from the study, so any of them can be written again.
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


def summarize(study: optuna.Study, n_trials: int, storage: str, out_dir: Path) -> SweepSummary:
    trials = study.get_trials(deepcopy=False)
    best = _best_trial(study)
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
    )


def _best_trial(study: optuna.Study) -> FrozenTrial | None:
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
    return key == "sweep" or key.split(".")[0] in ("study", "search_space", "hydra", "launcher")


def _leaf_diff(reference: DictConfig, cfg: DictConfig) -> list[tuple[str, Any]]:
    """(dotted key, value) where cfg differs from reference, interpolations unresolved."""
    ref = cast(dict[str, Any], OmegaConf.to_container(reference, resolve=False))
    new = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=False))
    out: list[tuple[str, Any]] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        for key, value in b.items():
            name = f"{prefix}{key}"
            if not prefix and key in ("study", "search_space", "hydra", "launcher"):
                continue
            if isinstance(value, dict) and isinstance(a.get(key), dict):
                walk(a[key], value, f"{name}.")
            elif key not in a or a[key] != value:
                out.append((name, value))

    walk(ref, new, "")
    return out


def write_results(
    study: optuna.Study, cfg: DictConfig, out_dir: Path, base_overrides: list[str]
) -> None:
    trials = study.get_trials(deepcopy=False)
    write_atomic(out_dir / "trials.csv", trials_csv(trials))
    best = _best_trial(study)
    if best is None:
        return
    write_atomic(out_dir / "best.yaml", best_yaml(study, cfg, best, base_overrides))


def trials_csv(trials: Sequence[FrozenTrial]) -> str:
    """One row per trial: number, state, value, duration, params, user attributes."""
    rows = []
    for t in trials:
        row: dict[str, Any] = {
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
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


def best_yaml(
    study: optuna.Study, cfg: DictConfig, best: FrozenTrial, base_overrides: Sequence[str]
) -> str:
    values = trial_values(best)
    trial_overrides = list(best.user_attrs.get("overrides") or to_overrides(values))
    searched = {o.split("=", 1)[0] for o in trial_overrides}
    overrides = [o for o in base_overrides if o.lstrip("+~").split("=", 1)[0] not in searched]
    overrides += trial_overrides
    command = "python -m kmnist_sweep " + " ".join(shlex.quote(o) for o in overrides)
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
    header = f"# Best trial of study {study.study_name}. Retrain it with:\n#   {command}\n"
    return header + OmegaConf.to_yaml(OmegaConf.create(body))


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    try:
        return cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
    except Exception as exc:
        raise ConfigError(f"the config does not resolve: {str(exc).splitlines()[0]}") from None
