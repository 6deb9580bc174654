"""The command line as a user runs it: help, one training run, a sweep, retraining the best."""

from __future__ import annotations

import csv
import json
import re
import subprocess
from pathlib import Path

import optuna
import pytest
import yaml
from PIL import Image

from kmnist_sweep.cli import COMMANDS
from tests.conftest import run_cli
from tests.results.test_tracking import API_KEY, history, offline_runs, run_config


def cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, cwd=cwd, env=env)


def test_help_lists_the_subcommands_and_config_groups(tmp_path: Path) -> None:
    out = cli("--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for name in COMMANDS:  # final, predict, report, copy-study
        assert re.search(rf"^python -m kmnist_sweep {name} ", out.stdout, re.M), name
    for group in ("data", "model", "trainer", "lr_finder", "batch_size", "study", "sweep"):
        assert re.search(rf"^{group}: ", out.stdout, re.M), f"group {group} missing"
    assert "kmnist_sample" in out.stdout and "batchsize" in out.stdout


def test_report_subcommand_rewrites_a_studys_report(tmp_path: Path) -> None:
    """`report` composes the config the sweep ran with and rewrites its report from the
    study's storage; a study that is not there is one line and exit status 2."""
    (tmp_path / "storage").mkdir()
    study = optuna.create_study(
        study_name="lr-synthetic",
        storage=f"sqlite:///{tmp_path}/storage/lr-synthetic.db",
        direction="maximize",
    )
    for lr in (0.01, 0.05, 0.2):
        trial = study.ask({"trainer.lr": optuna.distributions.FloatDistribution(1e-3, 1.0)})
        for epoch in (1, 2, 3):
            trial.report(0.5 + epoch * lr, epoch)
        study.tell(trial, 0.5 + 3 * lr)
    helped = cli("report", "--help", cwd=tmp_path)
    assert "usage: python -m kmnist_sweep report" in helped.stdout, helped.stderr
    args = ("report", "+sweep=lr", "data=synthetic", "tracking=disabled")
    out = cli(*args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    page = tmp_path / "sweeps" / "lr-synthetic" / "report" / "report.html"
    assert out.stdout.strip().endswith(f"report: {page.relative_to(tmp_path)}"), out.stdout
    assert "lr-synthetic" in page.read_text()
    missing = cli(*args, "study.name=nope", cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.strip() == (
        "kmnist_sweep: error: no study 'nope' in sqlite:///storage/nope.db"
    ), missing.stderr


# Bad input (one line, exit 2, nothing changed): docs/bad-input.md, tests/test_bad_input.py.


def test_single_training_run_prints_epochs_and_test_metric(tmp_path: Path) -> None:
    out = cli("data=synthetic", "trainer.epochs=2", "trainer.batch_size=64", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    epoch_line = r"^epoch 1/2 .*train/loss [\d.]+ .*val/loss [\d.]+.*val/acc"
    assert re.search(epoch_line, out.stdout, re.M)
    assert re.search(r"^epoch 2/2 ", out.stdout, re.M)
    assert re.search(r"^final: val/acc [\d.]+  test/acc [\d.]+", out.stdout, re.M)


@pytest.mark.slow
def test_batchsize_sweep_on_kmnist_sample_and_retrain_best(tmp_path: Path) -> None:
    sweep = cli(  # the README's run command, on the sample bundled with the package
        "+sweep=batchsize",
        "data=kmnist_sample",
        "study.n_trials=2",
        "trainer.epochs=1",
        "batch_size.min_steps=0",  # one epoch for each size, not the 100 steps of the sweep
        "++search_space.trainer.batch_size.low=512",
        "lr_finder.num_it=40",
        "tracking=offline",
        cwd=tmp_path,
        env={"WANDB_MODE": "offline", "WANDB_API_KEY": API_KEY, "PYTHONWARNINGS": ""},
    )
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    # No Python warning reaches the user's terminal (fastai's used to, from the range test).
    assert not re.search(r"\w+Warning: ", sweep.stderr), sweep.stderr[-3000:]
    assert (tmp_path / "storage" / "batchsize-kmnist_sample.db").exists()
    out_dir = tmp_path / "sweeps" / "batchsize-kmnist_sample"
    best = yaml.safe_load((out_dir / "best.yaml").read_text())
    assert (out_dir / "trials.csv").exists() and (out_dir / "config.yaml").exists()
    # One range test, at the default batch size (64), carried to each trial's size; SGD,
    # the default optimiser, takes the curve's bottom (`lr_finder.suggestion: auto`).
    curves = sorted(p.name for p in (out_dir / "lr_finder").glob("*.csv"))
    assert len(curves) == 1 and "-bs64-" in curves[0], curves
    assert re.search(r"^LR finder \(bottom, batch 64\): ", sweep.stdout, re.M), sweep.stdout
    report = out_dir / "report"
    assert "confusion.png" in (report / "report.html").read_text()
    for png in report.glob("*.png"):
        assert png.stat().st_size > 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The figures show validation predictions and say so, in their own words (PNG text).
    for name in ("confusion.png", "misclassified.png"):
        with Image.open(report / name) as png:
            words = png.text["Title"] + " | " + png.text["Description"]
        assert "validation" in words and "test" not in words, words
    with (report / "confusion.csv").open() as fh:
        rows = list(csv.reader(fh))[1:]
    # The best trial's validation predictions: 10% of the 8000 training images.
    assert len(rows) == 10 and sum(int(c) for row in rows for c in row[1:]) == 800
    # One offline wandb run per trial (plus the study's summary run), read back from disk.
    runs = offline_runs(out_dir)
    assert {"trial-0", "trial-1"} <= set(runs), sorted(runs)
    for name in ("trial-0", "trial-1"):
        records = runs[name]
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        assert run.run_group == "batchsize-kmnist_sample" and run.job_type == "trial"
        rows = [row for row in history(records) if "val/acc" in row]
        assert [row["epoch"] for row in rows] == [1]
        assert {"train/loss", "val/loss", "lr"} <= set(rows[0])
        config = run_config(records)
        assert config["batch_size/requested"] in (512, 1024, 2048)
        assert "trainer.batch_size.log2" in config["params"]
    leaked = [p for p in out_dir.rglob("*") if p.is_file() and API_KEY.encode() in p.read_bytes()]
    assert leaked == []
    assert_no_test_metric(sweep.stdout, tmp_path, out_dir)
    assert any(o.startswith("trainer.batch_size=") for o in best["overrides"])
    retrain = cli(*best["overrides"], cwd=tmp_path)
    assert retrain.returncode == 0, retrain.stderr[-3000:]
    found = re.search(r"^final: val/acc ([\d.]+)", retrain.stdout, re.M)
    assert found, retrain.stdout[-2000:]
    assert float(found.group(1)) == pytest.approx(best["value"], abs=1e-4)
    assert "not the official" in retrain.stdout


def assert_no_test_metric(stdout: str, root: Path, out_dir: Path) -> None:
    """The test split is for the final evaluation only: after a sweep, no trial attribute,
    trials.csv column, wandb record or file of the study holds a test metric."""
    summary = [line for line in stdout.splitlines() if line.startswith("study ")][-1]
    value = re.split(r"(?:best|recommended batch size \d+:) val/acc ", summary)[1].split(" ")[0]
    assert len(value.split(".")[1]) == 4, summary  # rounded, not 0.9599999785423279
    study = optuna.load_study(
        study_name="batchsize-kmnist_sample",
        storage=f"sqlite:///{root}/storage/batchsize-kmnist_sample.db",
    )
    assert study.metric_names == ["val/acc"]
    stored = json.dumps([study.user_attrs, [t.user_attrs for t in study.trials]])
    # No metric of the test split (the sample's note may still name the test images).
    assert re.findall(r"test[/_]", stored.lower()) == [], stored
    header = (out_dir / "trials.csv").read_text().splitlines()[0]
    assert "test" not in header.lower()
    files = [p for p in out_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files), "no offline wandb run was written"
    for path in files:
        data = path.read_bytes()
        assert b"test/acc" not in data and b"test/loss" not in data, path
        assert b"test_preds" not in data and path.name != "test_preds.npz", path
