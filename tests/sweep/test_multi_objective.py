"""Multi-objective studies (study.directions, study.metrics): the real objective through the
command line, and the runner's outputs, summary and clash checks on the toy objective.

Refusals (pruning, CMA-ES, lengths, unknown metrics, a single-objective study of the same
name) are rows of docs/bad-input.md, run by tests/test_bad_input.py.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import optuna
import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from kmnist_sweep.errors import ConfigError
from kmnist_sweep.results.bundle import read_bundle
from kmnist_sweep.sweep import local
from kmnist_sweep.sweep.runner import run_sweep
from kmnist_sweep.sweep.storage import open_storage
from tests.conftest import run_cli as cli

REPO = Path(__file__).resolve().parents[2]
TOY = "tests.toy_objective:make_toy_objective"
TWO = ("study.directions=[maximize,minimize]", "study.metrics=[val/acc,speed/train_s]")
PNG = b"\x89PNG\r\n\x1a\n"
# A `+sweep=full` shrunk to seconds per trial: one epoch, resnet18, batches of 32 or 64.
SMALL_FULL = (
    "+sweep=full",
    "data=synthetic",
    "data.n_train=128",
    "++search_space.trainer.epochs.high=1",
    "++search_space.model.arch.choices=[resnet18]",
    "++search_space.trainer.batch_size.high=64",
    "++search_space.trainer.lr.high=0.05",  # SGD above that can diverge on 128 random images
    "trainer.threads=1",
    "tracking=disabled",
)


@pytest.mark.slow
def test_a_multi_objective_full_sweep_shows_its_pareto_front(tmp_path: Path) -> None:
    done = cli(*SMALL_FULL, *TWO, "study.pruner.type=none", "study.n_trials=3", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(
        study_name="full-synthetic",
        storage=open_storage(f"sqlite:///{tmp_path}/storage/full-synthetic.db"),
    )
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert study.metric_names == ["val/acc", "speed/train_s"]
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 3
    for t in trials:  # the values are the metrics, in order; nothing reported per epoch
        assert t.values == [t.user_attrs["val"]["val/acc"], t.user_attrs["speed/train_s"]]
        assert t.intermediate_values == {}
    front = sorted(t.number for t in study.best_trials)

    # The summary line: the front's size and each front trial's values to 4 decimals.
    line = [s for s in done.stdout.splitlines() if s.startswith("study full-synthetic:")][-1]
    shown = re.search(
        r"Pareto front of (\d+) trial\(s\) over \(val/acc, speed/train_s\): (.*);", line
    )
    assert shown, line
    assert int(shown.group(1)) == len(front)
    listed = re.findall(r"#(\d+) \((\d+\.\d{4}), (\d+\.\d{4})\)", shown.group(2))
    assert [int(n) for n, _, _ in listed] == front, line

    out = tmp_path / "sweeps" / "full-synthetic"
    with (out / "trials.csv").open() as fh:
        header = next(csv.reader(fh))
    assert header[2:4] == ["values_val/acc", "values_speed/train_s"] and "value" not in header
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["metrics"] == ["val/acc", "speed/train_s"]
    assert [entry["trial"] for entry in best["pareto_front"]] == front
    for entry in best["pareto_front"]:
        assert set(entry["values"]) == {"val/acc", "speed/train_s"}
        assert entry["command"].startswith("python -m kmnist_sweep ")
        assert any(o.startswith("trainer.batch_size=") for o in entry["overrides"])

    # `final`: a front has no one best trial, so --trial picks one; the bundle records the
    # study's metrics and directions and the trial's values.
    refused = cli("final", "sweeps/full-synthetic", cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr.strip() == (
        "kmnist_sweep: error: sweeps/full-synthetic/best.yaml: the Pareto front of a "
        f"multi-objective study (trials {', '.join(map(str, front))}): pick one with --trial N"
    ), refused.stderr[-3000:]
    made = cli(
        "final", "sweeps/full-synthetic", "--trial", str(front[0]), "--out", "m.zip",
        "data.n_test=32", cwd=tmp_path,
    )  # fmt: skip
    assert made.returncode == 0 and "Traceback" not in made.stderr, made.stderr[-3000:]
    source = read_bundle(tmp_path / "m.zip").source
    assert source["trial"] == front[0]
    assert source["metrics"] == ["val/acc", "speed/train_s"]
    assert source["directions"] == ["maximize", "minimize"]
    values = study.trials[front[0]].values
    assert source["values"] == dict(zip(source["metrics"], values, strict=True))

    # The report opens with the front: a PNG, then a table naming both metrics.
    page = (out / "report" / "report.html").read_text()
    images = re.findall(r'<img src="([^"]+)"', page)
    assert images[0] == "pareto_front.png", images
    assert (out / "report" / "pareto_front.png").read_bytes()[:8] == PNG
    assert "<th>val/acc</th><th>speed/train_s</th>" in page
    assert "Optimisation history of val/acc" in page  # one-objective plots: the first metric


def two_objective_toy(*extra: str, sweep: str = "full") -> DictConfig:
    """`+sweep=full` on the toy objective (no training), two objectives, six trials."""
    overrides = [
        f"+sweep={sweep}",
        "data=synthetic",
        f"debug.objective={TOY}",
        "study.sampler.type=random",
        *TWO,
        "study.pruner.type=none",
        "study.n_trials=6",
        *extra,
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    with open_dict(cfg):
        cfg.toy = {"epochs": 2, "sleep": 0.0}
    return cfg


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """storage/ and sweeps/ under tmp_path; `tests.toy_objective` importable."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO))
    return tmp_path


def test_the_runner_summarises_and_writes_the_front(in_tmp: Path) -> None:
    cfg = two_objective_toy()
    summary = run_sweep(cfg)
    study = optuna.load_study(
        study_name=str(cfg.study.name), storage=open_storage(str(cfg.study.storage))
    )
    expected = sorted((t.number, t.values) for t in study.best_trials)
    assert summary.metrics == ["val/acc", "speed/train_s"]
    assert summary.front == expected and summary.complete == 6
    assert summary.best_value is None and summary.best_trial is None
    best = yaml.safe_load((Path(cfg.study.output_dir) / "best.yaml").read_text())
    assert [(e["trial"], list(e["values"].values())) for e in best["pareto_front"]] == expected
    assert best["directions"] == ["maximize", "minimize"]


def no_gpu_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "no GPU" in r.getMessage()]


def test_full_on_a_cpu_points_to_the_cpu_sized_space(
    in_tmp: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_sweep(two_objective_toy("study.n_trials=1", "trainer.device=cpu"))
    [line] = no_gpu_lines(caplog)
    assert "resnet50" in line and "small stem" in line and "30 epochs" in line
    assert "+sweep=full_cpu" in line
    caplog.clear()
    run_sweep(two_objective_toy("study.n_trials=1", "trainer.device=cpu", sweep="full_cpu"))
    assert not no_gpu_lines(caplog)
    # A fixed heavy value counts as much as a searched one.
    fixed = ("study.n_trials=1", "trainer.device=cpu", "model.stem=small", "study.name=fixed")
    run_sweep(two_objective_toy(*fixed, sweep="full_cpu"))
    [line] = no_gpu_lines(caplog)
    assert "small stem" in line and "resnet50" not in line
    caplog.clear()
    # With a GPU to train on, +sweep=full is what it is sized for: no warning.
    monkeypatch.setattr(local, "visible_gpus", lambda device="auto": ["0"])
    run_sweep(two_objective_toy("study.n_trials=1", "study.name=gpu", "study.workers=1"))
    assert not no_gpu_lines(caplog)


def test_an_existing_study_with_other_metrics_is_a_clash(in_tmp: Path) -> None:
    run_sweep(two_objective_toy())
    other = two_objective_toy("study.metrics=[val/acc,speed/images_per_s]")
    with pytest.raises(
        ConfigError,
        match=re.escape("with metric [val/acc, speed/train_s], not [val/acc, speed/images_per_s]"),
    ):
        run_sweep(other)
    single = two_objective_toy("study.directions=null", "study.metrics=null")
    with pytest.raises(ConfigError, match="with direction maximize/minimize, not maximize:"):
        run_sweep(single)
