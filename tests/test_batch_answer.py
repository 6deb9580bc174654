"""The batch-size sweep's answer: what halves, what counts as trained, the noise band."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import torch
from optuna.distributions import IntDistribution
from optuna.trial import TrialState, create_trial

from kmnist_sweep.results.batchsize import SizeRow, recommend
from kmnist_sweep.train.standard_error import standard_errors
from tests.conftest import run_cli

STUDY = "batchsize-synthetic"


def test_a_flat_loss_in_warm_up_trains_on_and_is_named_did_not_learn(tmp_path: Path) -> None:
    """The LR finder's range ends at 1e-8, so the run's loss stays flat for its 29 steps:
    a warm-up that looks like this is no failure (no halving), and a size that ends at
    chance is shown as "did not learn", never recommended or counted as trained."""
    out = run_cli(
        "+sweep=batchsize",
        "data=synthetic",
        "data.n_train=1024",
        "data.image_size=16",
        "trainer.epochs=1",
        "++search_space.trainer.batch_size.high=32",
        "study.n_trials=1",
        "lr_finder.start_lr=1e-9",
        "lr_finder.end_lr=1e-8",
        "lr_finder.num_it=10",
        "tracking=disabled",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "batch size: no size trained at its own size and learned" in out.stdout, out.stdout
    assert "32 (did not learn)" in out.stdout
    out_dir = tmp_path / "sweeps" / STUDY
    [row] = list(csv.DictReader((out_dir / "trials.csv").open()))
    assert row["batch_size/halvings"] == "[]" and row["batch_size/effective"] == "32"
    assert row["did_not_learn"].startswith("did not learn: validation accuracy")
    html = (out_dir / "report" / "report.html").read_text()
    assert "<td>32</td>\n<td>did not learn</td>" in html.replace("><td", ">\n<td"), html[-3000:]

    # Each metric's standard error by its own rule, from the saved validation predictions.
    with np.load(out_dir / "trials" / "0" / "val_preds.npz") as npz:
        preds, labels = npz["preds"], npz["labels"]
    p = float((preds == labels).mean())
    assert float(row["val/acc_se"]) == pytest.approx(math.sqrt(p * (1 - p) / len(labels)), 1e-4)
    recalls = [(preds[labels == c] == c).mean() for c in np.unique(labels)]
    counts = [(labels == c).sum() for c in np.unique(labels)]
    bacc = math.sqrt(sum(r * (1 - r) / n for r, n in zip(recalls, counts, strict=True)))
    assert float(row["val/bacc_se"]) == pytest.approx(bacc / len(counts), 1e-4)
    assert 0 < float(row["val/loss_se"]) < 1


def test_standard_errors_follow_each_metrics_rule() -> None:
    # Class 0: 2 images, 1 right; class 1: 98 images, 49 right.
    labels = torch.tensor([0, 0] + [1] * 98)
    preds = torch.tensor([0, 1] + [1] * 49 + [0] * 49)
    losses = torch.tensor([1.0, 3.0] * 50)
    errors = standard_errors(preds, labels, losses, num_classes=3)
    assert errors["val/acc"] == pytest.approx(math.sqrt(0.5 * 0.5 / 100))
    # The 2-image class dominates: far wider than a binomial on 100 images.
    assert errors["val/bacc"] == pytest.approx(math.sqrt(0.25 / 2 + 0.25 / 98) / 2)
    assert errors["val/bacc"] > 3 * errors["val/acc"]
    assert errors["val/loss"] == pytest.approx(float(losses.std()) / 10)


def row(size: int, value: float, noise: float | None, speed: float) -> SizeRow:
    return SizeRow(size, size, "trained", value, speed, 1.0, 100.0, 0.01, trial=size, noise=noise)


def test_the_band_is_the_metrics_own_or_none() -> None:
    # A loss of 0.30 +- 0.02 vs 0.33: within 2 standard errors, so the faster counts.
    pick = recommend([row(32, 0.30, 0.02, 100), row(64, 0.33, 0.02, 200)], "val/loss", False)
    assert pick is not None and pick.batch_size == 64
    assert "from the per-image losses" in pick.rule
    # The binomial of a "p" of 0.30 would be 0.0145 on 1000 images: 0.33 would fall outside.
    pick = recommend([row(32, 0.30, 0.005, 100), row(64, 0.33, 0.005, 200)], "val/loss", False)
    assert pick is not None and pick.batch_size == 32
    pick = recommend([row(32, 5.0, None, 100), row(64, 5.1, None, 200)], "speed/x", True)
    assert pick is not None and pick.batch_size == 64
    assert "no noise band for speed/x" in pick.rule


def _trial(size: int, state: TrialState, value: float | None, **attrs: Any) -> Any:
    user_attrs = {
        "batch_size/requested": size,
        "batch_size/effective": size,
        "batch_size/fitted": True,
        "batch_size/halvings": [],
        "speed/images_per_s": 100.0 * size,
        "val_se": {"val/acc_se": 0.01},
        **attrs,
    }
    return create_trial(
        state=state,
        value=value,
        params={"trainer.batch_size.log2": int(math.log2(size))},
        distributions={"trainer.batch_size.log2": IntDistribution(5, 9)},
        user_attrs=user_attrs,
    )


def test_failed_interrupted_and_chance_level_sizes_are_not_counted(tmp_path: Path) -> None:
    """`report` on a study where 32 and 64 trained, 128 was interrupted, 256 failed and 512
    ended at chance: the largest that trained is 64, and the others say what they were."""
    (tmp_path / "storage").mkdir()
    study = optuna.create_study(
        study_name=STUDY,
        storage=f"sqlite:///{tmp_path}/storage/{STUDY}.db",
        direction="maximize",
    )
    study.add_trial(_trial(32, TrialState.COMPLETE, 0.95))
    study.add_trial(_trial(64, TrialState.COMPLETE, 0.90))
    study.add_trial(_trial(128, TrialState.FAIL, None, interrupted="SIGINT"))
    study.add_trial(_trial(256, TrialState.FAIL, None, error="RuntimeError: boom"))
    study.add_trial(_trial(512, TrialState.COMPLETE, 0.10, did_not_learn="did not learn: ..."))
    space = {"trainer.batch_size": {"type": "pow2", "low": 32, "high": 512}}
    study.set_user_attr("search_space", space)
    out = run_cli(
        "report", "+sweep=batchsize", "data=synthetic", "tracking=disabled", cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    html = (tmp_path / "sweeps" / STUDY / "report" / "report.html").read_text()
    assert "Recommended: batch 32" in html
    assert "not counted: 128 (interrupted), 256 (failed), 512 (did not learn)" in html
    cells = html.replace("><td", ">\n<td")
    for size, shown in ((128, "interrupted"), (256, "failed"), (512, "did not learn")):
        assert f"<td>{size}</td>\n<td>{shown}</td>" in cells, cells[-3000:]
    assert "largest that trained and learned: 64" in _figure_labels(tmp_path)


def _figure_labels(tmp_path: Path) -> str:
    """The legend texts of the batch-size figure, drawn again from the study."""
    from kmnist_sweep.results.batchsize import plot_sizes, size_answer

    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{tmp_path}/storage/{STUDY}.db")
    answer = size_answer(study, "val/acc")
    assert answer is not None
    fig = plot_sizes(answer.rows, answer.pick, answer.metric)
    return " | ".join(t.get_text() for t in fig.axes[0].get_legend().get_texts())
