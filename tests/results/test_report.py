"""Report: real Optuna plots from an in-memory study, a confusion matrix, one HTML page."""

from __future__ import annotations

import csv
import re
import warnings
from pathlib import Path

import numpy as np
import optuna
import pytest
from PIL import Image

import kmnist_sweep  # noqa: F401  (torchvision compat first)
from kmnist_sweep.data.datasets import K49_CLASSES, KMNIST_CLASSES
from kmnist_sweep.results import confusion, report
from kmnist_sweep.results.report import confusion_matrix, write_report

CLASSES = list("おきすつなはまやれを")  # KMNIST's ten hiragana
NOTE = "kmnist_sample: not the official protocol"


def small_study() -> optuna.Study:
    """Six trials over two parameters with per-epoch values: one pruned, five complete."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name="report-test", direction="maximize", sampler=optuna.samplers.RandomSampler(0)
    )

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("trainer.lr", 1e-4, 1e-1, log=True)
        batch = trial.suggest_categorical("trainer.batch_size", [64, 128, 256])
        acc = 0.0
        for epoch in range(1, 4):
            acc = 0.9 - abs(np.log10(lr) + 2) * 0.1 - batch / 5000 + 0.01 * epoch
            trial.report(acc, epoch)
        if trial.number == 3:
            raise optuna.TrialPruned()
        return acc

    study.optimize(objective, n_trials=6)
    return study


def synthetic_test_set(n: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, n)
    preds = np.where(rng.random(n) < 0.8, labels, rng.integers(0, 10, n))
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    return labels, preds, images


def lr_curve(path: Path) -> Path:
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(path)
    return path


def test_report_writes_valid_pngs_html_and_csv(tmp_path: Path) -> None:
    labels, preds, images = synthetic_test_set()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        page = write_report(
            small_study(),
            tmp_path,
            classes=CLASSES,
            labels=labels,
            preds=preds,
            images=images,
            lr_curves=[lr_curve(tmp_path / "lr_finder.png")],
            note=NOTE,
        )
    assert not glyph_warnings(caught)  # characters drawn with a CJK font, or as U+XXXX
    assert page == tmp_path / "report" / "report.html"
    text = page.read_text(encoding="utf-8")
    referenced = re.findall(r'<img src="([^"]+)"', text)
    expected = {
        "optimization_history.png",
        "param_importances.png",
        "parallel_coordinate.png",
        "slice.png",
        "intermediate_values.png",
        "lr_finder_0_lr_finder.png",
        "confusion.png",
        "misclassified.png",
    }
    assert set(referenced) == expected
    for name in referenced:
        with Image.open(page.parent / name) as png:
            assert png.format == "PNG" and png.width > 0 and png.height > 0
            png.verify()
    for name in ("confusion.png", "misclassified.png"):  # a sweep's figures: validation
        with Image.open(page.parent / name) as png:
            words = png.text["Title"] + " | " + png.text["Description"]
        assert "validation" in words and "test" not in words, words
    assert NOTE in text and "report-test" in text
    assert "6 (5 complete, 1 pruned)" in text
    accuracy = float(np.mean(labels == preds))
    balanced = np.mean([np.mean(preds[labels == c] == c) for c in range(10)])
    assert f"<th>validation accuracy</th><td>{accuracy:.4f} ({NOTE})</td>" in text
    assert f"<th>validation balanced accuracy</th><td>{balanced:.4f} ({NOTE})</td>" in text

    with (page.parent / "confusion.csv").open(encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0][1:] == CLASSES and [r[0] for r in rows[1:]] == CLASSES
    counts = np.array([[int(v) for v in r[1:]] for r in rows[1:]])
    assert counts.sum() == len(labels)
    assert np.trace(counts) == np.sum(labels == preds)


def test_confusion_matrix_counts() -> None:
    matrix = confusion_matrix(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 0, 2]), 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    with pytest.raises(ValueError):
        confusion_matrix(np.array([0, 3]), np.array([0, 1]), 3)


def test_sparse_study_skips_plots_with_a_note(tmp_path: Path) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="one-param")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    text = write_report(study, tmp_path).read_text(encoding="utf-8")
    assert "needs at least 2 complete trials and 2 parameters (have 1 and 1)" in text
    assert "no trial reported per-epoch values" in text
    assert 'src="optimization_history.png"' in text
    assert not (tmp_path / "report" / "confusion.csv").exists()

    # Predictions that do not fit the classes lose the confusion matrix, not the report.
    labels, preds = np.array([0, 1]), np.array([0, 2])
    text = write_report(study, tmp_path, classes=["a", "b"], labels=labels, preds=preds).read_text(
        encoding="utf-8"
    )
    assert "not drawn: predictions outside 0..1" in text


def test_labels_fall_back_to_code_points_without_a_cjk_font(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert confusion.tick_labels(["お", "ゝ"], None) == ["U+304A", "U+309D"]
    monkeypatch.setattr(report, "find_cjk_font", lambda text: None)
    labels, preds, images = synthetic_test_set(40)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        page = write_report(
            optuna.create_study(),
            tmp_path,
            classes=CLASSES,
            labels=labels,
            preds=preds,
            images=images,
        )
    assert not glyph_warnings(caught)
    for name in ("confusion.png", "misclassified.png"):
        with Image.open(page.parent / name) as png:
            png.verify()


def glyph_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    """matplotlib's complaints about characters its font cannot draw (empty boxes)."""
    return [str(w.message) for w in caught if "missing from font" in str(w.message)]


def test_a_pip_install_alone_draws_the_characters(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no CJK font installed on the machine (none in matplotlib's cache or the system's
    list), the font shipped by a dependency covers KMNIST's and K49's classes and the arrow of
    the misclassified grid, so the labels are the characters, not U+XXXX."""
    monkeypatch.setattr(confusion.font_manager.fontManager, "ttflist", [])
    monkeypatch.setattr(confusion.font_manager, "findSystemFonts", lambda *a, **k: [])
    confusion._font_covering.cache_clear()
    try:
        text = "".join(KMNIST_CLASSES + K49_CLASSES) + "→"
        font = confusion.find_cjk_font(text)
    finally:
        confusion._font_covering.cache_clear()
    assert font is not None and font.get_file() == confusion.shipped_font()
    assert confusion.tick_labels(["お", "ゝ"], font) == ["お", "ゝ"]
