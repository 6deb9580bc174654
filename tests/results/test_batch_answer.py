"""The batch-size sweep's answer: what halves, what counts as trained, the noise band."""

from __future__ import annotations

import ast
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
    assert "Recommended batch size: none; no size trained at its own size and learned" in (
        out.stdout
    ), out.stdout
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
    """A size that reaches its final `value` after one epoch of 1000 / `speed` seconds."""
    curve = [{"epoch": 1.0, "steps": 100.0, "seconds": 1000 / speed, "val/loss": value}]
    curve[0]["val/acc"] = curve[0]["speed/x"] = value
    return SizeRow(
        size, size, "trained", value, speed, 1.0, 100.0, 0.01, trial=size, noise=noise, curve=curve
    )


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
        "curve": [{"epoch": 1.0, "steps": 100.0, "seconds": 10.0, "val/acc": value or 0.0}],
        "noise_scale": [None, 100.0, 2.0 * size],
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
    assert "Recommended batch size: 32." in html
    # Noise scale per size: the median of its last two epochs (100 and 2 x size); the
    # sweep's: the median over the sizes that count (82 and 114).
    assert "Gradient noise scale: 98 images (median over sizes)" in html
    assert "not counted: 128 (interrupted), 256 (failed), 512 (did not learn)" in html
    cells = html.replace("><td", ">\n<td")
    for size, shown in ((128, "interrupted"), (256, "failed"), (512, "did not learn")):
        assert f"<td>{size}</td>\n<td>{shown}</td>" in cells, cells[-3000:]
    assert "largest that trained and learned: 64" in _figure_labels(tmp_path)


def _figure_labels(tmp_path: Path) -> str:
    """The legend texts of the batch-size figure, drawn again from the study."""
    from kmnist_sweep.results.batchsize import size_answer
    from kmnist_sweep.results.batchsize_plot import plot_sizes

    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{tmp_path}/storage/{STUDY}.db")
    answer = size_answer(study, "val/acc")
    assert answer is not None
    fig = plot_sizes(answer)
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    return " | ".join(t.get_text() for legend in legends for t in legend.get_texts())


def timed(size: int, points: list[tuple[float, float, float]], speed: float) -> SizeRow:
    """A trained size whose curve is (steps, seconds, val/acc) at the end of each epoch."""
    curve = [
        {"epoch": float(i + 1), "steps": steps, "seconds": secs, "val/acc": acc}
        for i, (steps, secs, acc) in enumerate(points)
    ]
    value = points[-1][2]
    return SizeRow(
        size, size, "trained", value, speed, 1.0, 100.0, 0.01, trial=size, noise=0.005, curve=curve
    )


def test_the_recommendation_is_the_size_first_at_the_target_in_seconds() -> None:
    """The target is the best final 0.96 less 2 standard errors (0.95). 128 trains the most
    images per second and ends within the band, but 256 gets to 0.95 sooner: 256."""
    rows = [
        timed(32, [(200, 10, 0.90), (400, 20, 0.95), (600, 30, 0.96)], 640),
        timed(128, [(50, 4, 0.85), (100, 8, 0.93), (150, 12, 0.956)], 2000),
        timed(256, [(25, 3, 0.80), (50, 6, 0.951), (75, 9, 0.955)], 1700),
        timed(2048, [(4, 2, 0.50), (8, 4, 0.80), (12, 6, 0.93)], 2500),
    ]
    pick = recommend(rows, "val/acc")
    assert pick is not None and pick.batch_size == 256 and pick.target == pytest.approx(0.95)
    assert pick.rule.startswith(
        "target val/acc >= 0.9500 (the best final value, 0.9600 at batch 32, less 2 standard "
        "errors (0.0100, binomial on the validation images)); batch 256 reaches it first: "
        "6.0 s of training (50 steps, epoch 2 of 3); not reached within their budget: "
        "2048 (0.9300 after 12 steps)"
    ), pick.rule
    reach = pick.reach
    assert [(reach[t].steps, reach[t].seconds) for t in (32, 128, 256)] == [  # type: ignore[union-attr]
        (400, 20),
        (150, 12),
        (50, 6),
    ]
    assert reach[2048] is None
    # A target the user sets: 0.85 is first reached by 128, at 4 s.
    pick = recommend(rows, "val/acc", target=0.85)
    assert pick is not None and pick.batch_size == 128 and "(batch_size.target)" in pick.rule
    # The knee: the first size whose doubling saves less than a quarter of the steps.
    rows = [timed(32, [(400, 9, 0.95)], 1), timed(64, [(200, 8, 0.95)], 1)]
    rows.append(timed(128, [(180, 7, 0.95)], 1))
    pick = recommend(rows, "val/acc")
    assert pick is not None and pick.knee == 64


@pytest.mark.slow
def test_a_sweep_times_each_size_to_the_target_and_gives_one_answer(tmp_path: Path) -> None:
    """32, 64 and 128 on 924 training images, batch_size.min_steps=20: 64 and 128 get more
    epochs (ceil(20 / 15) = 2, ceil(20 / 8) = 3). Each trial records its curve; the answer is
    the size first at the target in seconds of training, and the summary line, best.yaml,
    the report and `final sweeps/<study>` all name that size."""
    out = run_cli(
        "+sweep=batchsize",
        "data=synthetic",
        "data.n_train=1024",
        "data.image_size=16",
        "trainer.epochs=1",
        "++search_space.trainer.batch_size.high=128",
        "study.n_trials=3",
        "lr_finder.num_it=20",
        "batch_size.min_steps=20",
        "tracking=disabled",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    out_dir = tmp_path / "sweeps" / STUDY
    rows = {
        int(r["batch_size/requested"]): r for r in csv.DictReader((out_dir / "trials.csv").open())
    }
    curves = {size: ast.literal_eval(r["curve"]) for size, r in rows.items()}
    assert {size: len(c) for size, c in curves.items()} == {32: 1, 64: 2, 128: 3}
    assert [p["steps"] for p in curves[128]] == [8, 16, 24]
    assert all(c[-1]["seconds"] > 0 and "val/acc" in c[-1] for c in curves.values())

    # The target and the first size at it, from the recorded curves alone.
    best = max(rows.values(), key=lambda r: float(r["value"]))
    target = float(best["value"]) - 2 * float(best["val/acc_se"])
    first = {
        size: next((p["seconds"] for p in c if p["val/acc"] >= target - 1e-9), math.inf)
        for size, c in curves.items()
    }
    size = min(first, key=lambda s: (first[s], s))
    trial = int(rows[size]["number"])
    assert f"Recommended batch size: {size}. Rule: target val/acc >= {target:.4f}" in out.stdout
    assert f"recommended batch size {size}: val/acc" in out.stdout
    assert f"(trial {trial})" in out.stdout.splitlines()[-1]
    best_yaml = (out_dir / "best.yaml").read_text()
    assert best_yaml.startswith("# Recommended batch size of study")
    assert f"trial: {trial}\n" in best_yaml and f"trainer.batch_size={size}" in best_yaml
    html = (out_dir / "report" / "report.html").read_text()
    assert f"<th>recommended trial</th><td>#{trial}:" in html
    assert "steps to target" in html

    final = run_cli("final", f"sweeps/{STUDY}", "--out", "m.zip", cwd=tmp_path)
    assert final.returncode == 0, final.stderr[-3000:]
    epochs = len(curves[size])
    assert f"final: trial {trial} of study {STUDY} (resnet18, batch {size}," in final.stdout
    assert f"{epochs} epochs) on train+valid" in final.stdout, final.stdout
