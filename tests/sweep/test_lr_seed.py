"""The LR finder in a study (sweep/lr_seed.py): one range test per curve, kept as an Optuna
artifact under the study folder, a small reference in the study's attributes."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import optuna
from omegaconf import DictConfig
from optuna.artifacts import get_all_artifact_meta

from kmnist_sweep.data.datasets import load_dataset
from kmnist_sweep.sweep import lr_seed


def test_the_curve_is_an_artifact_and_the_study_keeps_a_reference(
    compose_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    cfg = compose_cfg(
        "data=synthetic", "data.n_train=1024", "lr_finder.num_it=30", f"study.output_dir={out}"
    )
    data = load_dataset(cfg.data)
    storage = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(storage=storage, study_name="s")
    curve = lr_seed.cached_curve(study, cfg, data, 64)
    assert len(curve.lrs) > 5 and set(curve.suggestions) == {"minimum", "valley", "bottom"}
    [meta] = get_all_artifact_meta(study)
    assert meta.filename.endswith(".json") and (out / "artifacts" / meta.artifact_id).exists()
    assert list((out / "lr_finder").glob("*.png")) and list((out / "lr_finder").glob("*.csv"))
    [(key, ref)] = [(k, v) for k, v in study.user_attrs.items() if k.startswith("lr_finder:")]
    assert ref["artifact_id"] == meta.artifact_id
    assert len(json.dumps(ref)) < 300, "a reference, not the curve"

    # Another worker loads the study: the same curve, no second range test.
    again = optuna.load_study(storage=storage, study_name="s")
    assert lr_seed.cached_curve(again, cfg, data, 64) == curve
    assert len(get_all_artifact_meta(again)) == 1
    # A machine without the study folder seeds the same LRs from the reference.
    shutil.rmtree(out / "artifacts")
    elsewhere = lr_seed.cached_curve(again, cfg, data, 64)
    assert (elsewhere.batch_size, elsewhere.suggestions) == (64, curve.suggestions)
    # A study cached before the artifact store kept the whole curve in the attribute.
    study.set_user_attr(key, curve.to_json())
    assert lr_seed.cached_curve(again, cfg, data, 64) == curve
