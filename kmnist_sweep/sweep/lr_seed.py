"""The LR finder in a study: one range test per curve key for the whole study, and the LR
each trial starts from.

A curve is a file in Optuna's artifact store under the study folder
(`<study.output_dir>/artifacts`, which optuna-dashboard shows with `--artifact-dir`); the
study's user attribute `lr_finder:<key>` keeps a small reference to it: the artifact id,
the batch size and the suggested LRs. The suggestions travel with the reference, so a
worker on another machine sharing the study's storage but not its folder seeds the same LR.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound

from kmnist_sweep import trial_attrs
from kmnist_sweep.data.contract import Dataset
from kmnist_sweep.train.lr_finder import (
    Curve,
    curve_key,
    plot_curve,
    rule_for,
    run_range_test,
    save_csv,
    scale_lr,
)

log = logging.getLogger(__name__)

CACHE_PREFIX = trial_attrs.LR_CURVE_PREFIX  # + curve_key(...): a study attribute with a curve
ARTIFACTS = "artifacts"  # the artifact store's folder under study.output_dir


def artifact_store(cfg: DictConfig) -> FileSystemArtifactStore:
    path = Path(str(cfg.study.output_dir)) / ARTIFACTS
    path.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(path)


def store_curve(study: optuna.Study, cfg: DictConfig, curve: Curve, key: str) -> dict[str, Any]:
    """Upload the curve as `<key>.json` to the study's artifacts; the reference to keep."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{key}.json"
        path.write_text(curve.to_json())
        artifact_id = upload_artifact(
            artifact_store=artifact_store(cfg),
            file_path=str(path),
            study_or_trial=study,
            mimetype="application/json",
        )
    return {
        "artifact_id": artifact_id,
        "batch_size": curve.batch_size,
        "suggestions": curve.suggestions,
    }


def read_curve(stored: Any, cfg: DictConfig) -> Curve:
    """The curve a study attribute refers to. Without the artifact's file (another machine),
    the reference's suggestions alone; a study from before the artifact store kept the
    whole curve as JSON in the attribute."""
    if isinstance(stored, str):
        return Curve.from_json(stored)
    try:
        with artifact_store(cfg).open_reader(str(stored["artifact_id"])) as reader:
            return Curve.from_json(reader.read().decode())
    except ArtifactNotFound:
        return Curve([], [], int(stored["batch_size"]), dict(stored["suggestions"]))


def cached_curve(study: optuna.Study, cfg: DictConfig, dataset: Dataset, batch_size: int) -> Curve:
    """The curve for (data, model, stem, batch, precision, ...), run once per study; its CSV
    and plot go to `<study.output_dir>/lr_finder/`."""
    key = curve_key(cfg, batch_size)
    stored = study.user_attrs.get(CACHE_PREFIX + key)
    if stored is not None:
        return read_curve(stored, cfg)
    log.info("LR finder: range test at batch %d (%s)", batch_size, key)
    curve = run_range_test(cfg, dataset, batch_size)
    study.set_user_attr(CACHE_PREFIX + key, store_curve(study, cfg, curve, key))
    out = Path(str(cfg.study.output_dir)) / "lr_finder"
    save_csv(curve, out / f"{key}.csv")
    plot_curve(curve, out / f"{key}.png", chosen=rule_for(cfg))
    log.info(
        "LR finder: %s -> plot %s",
        ", ".join(f"{k} {v:.3g}" for k, v in curve.suggestions.items()),
        out / f"{key}.png",
    )
    return curve


def seeded_lr(
    study: optuna.Study, cfg: DictConfig, dataset: Dataset, batch_size: int
) -> tuple[float, str]:
    """The finder's LR for this batch size and a one-line account of where it came from."""
    fcfg = cfg.lr_finder
    rule = rule_for(cfg)
    if fcfg.scale == "rerun":
        curve = cached_curve(study, cfg, dataset, batch_size)
        return curve.lr(rule), f"{rule} at batch {batch_size}"
    ref = int(fcfg.batch_size)
    curve = cached_curve(study, cfg, dataset, ref)
    lr = scale_lr(curve.lr(rule), ref, batch_size, str(fcfg.scale))
    return lr, f"{rule} at batch {ref}, scaled {fcfg.scale} to batch {batch_size}"


def prepare(
    study: optuna.Study,
    cfg: DictConfig,
    seeded: Sequence[str],
    dataset: Callable[[], Dataset],
    searched: Sequence[str] = (),
) -> None:
    """Before any worker starts: run the range test once and, for the `searched` factors,
    queue a first trial that uses the finder's LR itself (factor 1), so the search starts
    from the suggestion."""
    if not seeded:
        return
    if cfg.lr_finder.scale != "rerun":
        curve = cached_curve(study, cfg, dataset(), int(cfg.lr_finder.batch_size))
        rule = rule_for(cfg)
        print(
            f"LR finder ({rule}, batch {curve.batch_size}): {curve.lr(rule):.3g}; "
            f"curve in {Path(str(cfg.study.output_dir)) / 'lr_finder'}",
            flush=True,
        )
    if searched and not study.get_trials(deepcopy=False):
        study.enqueue_trial({f"{name}.factor": 1.0 for name in searched})
