"""`final --trial N`: another trial than the best one, read from the study's storage.

A cheap study (the toy objective: no training) gives the trials; `final` then really trains
trial N's config on synthetic data for one epoch. The accuracy checks on real characters are
in tests/results/test_final_predict.py (slow).
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml
from omegaconf import OmegaConf
from PIL import Image

import kmnist_sweep  # noqa: F401  (torchvision compat first)
from kmnist_sweep.errors import UserError
from kmnist_sweep.results.bundle import (
    BUNDLE_JSON,
    WEIGHTS,
    load_model,
    make_bundle,
    read_bundle,
    write_bundle,
)
from kmnist_sweep.results.outputs import trial_values
from kmnist_sweep.sweep.final import read_study_config, study_trial
from kmnist_sweep.train.model import build_model
from tests.conftest import run_cli as cli

TOY_STUDY = (
    "+sweep=lr",
    "data=synthetic",
    "debug.objective=tests.toy_objective:make_toy_objective",
    "study.n_trials=3",
    "study.sampler.type=random",
    "study.pruner.type=none",
)


@pytest.mark.slow
def test_final_trains_the_trial_named_by_number(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = cli(*TOY_STUDY, cwd=tmp_path)
    assert made.returncode == 0, made.stderr[-3000:]
    study = optuna.load_study(
        study_name="lr-synthetic", storage="sqlite:///" + str(tmp_path / "storage/lr-synthetic.db")
    )
    best, other = (
        study.best_trial.number,
        next(t for t in study.trials if t.number != study.best_trial.number),
    )
    lr = trial_values(other)["trainer.lr"]

    out = cli(
        "final",
        "sweeps/lr-synthetic",
        "--trial",
        str(other.number),
        "--out",
        "models/m.zip",
        "trainer.epochs=1",
        "data.n_test=32",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert re.search(r"^epoch 1/1  train/loss [\d.]+$", out.stdout, re.M), out.stdout
    line = re.search(
        r"^final: test/acc [\d.]+ on 32 test images \(trial (\d+) .*$", out.stdout, re.M
    )
    assert line and int(line.group(1)) == other.number != best, out.stdout
    assert "[synthetic: random class patterns plus noise, not characters]" in line.group(0)
    bundle = read_bundle(tmp_path / "models" / "m.zip")
    assert bundle.source["trial"] == other.number
    assert bundle.config["trainer"]["lr"] == lr  # the trial's LR, not the best one's
    assert (bundle.config["trainer"]["epochs"], bundle.metrics["test/images"]) == (1, 32)
    assert bundle.views == bundle.config["trainer"]["test_views"] == 5  # the shipped default
    assert bundle.data == {
        "name": "synthetic",
        "note": "synthetic: random class patterns plus noise, not characters",
        "files": {},
    }

    # Options before the images, too; a random picture gets some top-2 answer.
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30), np.uint8)).save(
        tmp_path / "noise.png"
    )
    guessed = cli("predict", "--top-k", "2", "models/m.zip", "noise.png", cwd=tmp_path)
    assert guessed.returncode == 0, guessed.stderr[-3000:]
    top2 = r"noise\.png  \d [01]\.\d{3}  \d [01]\.\d{3}(  \[inverted\])?\n"
    assert re.fullmatch(top2, guessed.stdout), guessed.stdout

    # A password masked in config.yaml cannot open the storage: --storage names it instead.
    monkeypatch.chdir(tmp_path)
    cfg = read_study_config(Path("sweeps/lr-synthetic"))
    cfg.study.storage = "postgresql://kmnist:***@db.example/kmnist"
    with pytest.raises(UserError, match="password masked .*pass --storage URL"):
        study_trial(cfg, other.number, None)
    chosen = study_trial(cfg, other.number, "sqlite:///storage/lr-synthetic.db")
    assert chosen.values == trial_values(other) and chosen.value == other.value


@pytest.mark.slow
def test_a_study_from_before_test_views_and_ema_is_recorded_and_tested_as_then(
    tmp_path: Path,
) -> None:
    """A sweep's config.yaml written before trainer.test_views, trainer.ema and
    batch_size.min_steps existed: final records no weight average and tests one view, as the
    study's trials ran. It also predates
    the debug group, whose switches then sat in the study, batch_size and launcher groups."""
    made = cli(*TOY_STUDY, cwd=tmp_path)
    assert made.returncode == 0, made.stderr[-3000:]
    snapshot = tmp_path / "sweeps/lr-synthetic/config.yaml"
    old = yaml.safe_load(snapshot.read_text())
    del old["trainer"]["test_views"], old["trainer"]["ema"], old["batch_size"]["min_steps"]
    debug = old.pop("debug")
    old["study"]["objective"] = debug["objective"]
    old["batch_size"]["inject_oom"] = debug["inject_oom"]
    old["launcher"]["executor"] = debug["executor"]
    snapshot.write_text(yaml.safe_dump(old))
    out = cli("final", "sweeps/lr-synthetic", "trainer.epochs=1", "data.n_test=32", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "test once on 32 (1 view each)" in out.stdout, out.stdout
    path = re.search(r"^bundle: (.+)$", out.stdout, re.M)
    bundle = read_bundle(tmp_path / path[1]) if path else None
    assert bundle and bundle.views == 1 and bundle.config["trainer"]["ema"] == 0


@pytest.mark.slow
def test_resuming_a_study_from_before_ema_asks_which_recipe(tmp_path: Path) -> None:
    """Its trials ran on the live weights: going on must not silently average new ones."""
    made = cli(*TOY_STUDY, cwd=tmp_path)
    assert made.returncode == 0, made.stderr[-3000:]
    snapshot, db = (
        tmp_path / "sweeps/lr-synthetic/config.yaml",
        tmp_path / "storage/lr-synthetic.db",
    )
    old = yaml.safe_load(snapshot.read_text())
    del old["trainer"]["ema"]
    snapshot.write_text(yaml.safe_dump(old))
    stored = db.read_bytes()
    more = [o for o in TOY_STUDY if not o.startswith("study.n_trials")] + ["study.n_trials=4"]
    refused = cli(*more, cwd=tmp_path)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        "kmnist_sweep: error: study 'lr-synthetic' ran its trials without a weight average "
        "(its config.yaml predates trainer.ema): add trainer.ema=0 to go on as they ran, or "
        "trainer.ema=0.99 to average from here on"
    )
    assert db.read_bytes() == stored and yaml.safe_load(snapshot.read_text()) == old
    resumed = cli(*more, "trainer.ema=0", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert yaml.safe_load(snapshot.read_text())["trainer"]["ema"] == 0


def test_a_bundle_reads_back_and_damaged_ones_are_one_line(tmp_path: Path) -> None:
    cfg = OmegaConf.create({"model": {"arch": "resnet18", "stem": "small", "pretrained": True}})
    model = build_model(OmegaConf.create({**cfg.model, "pretrained": False}), 3)
    good = tmp_path / "good.zip"
    write_bundle(
        good,
        make_bundle(
            cfg,
            classes=list("あいう"),
            image_size=28,
            mean=0.1,
            std=0.2,
            views=5,
            model=model,
            data_name="synthetic",
            note="",
            files=(),
            source={"trial": 4},
        ).with_metrics({"test/acc": 0.5}),
    )
    bundle = read_bundle(good)
    assert bundle.classes == list("あいう") and bundle.metrics == {"test/acc": 0.5}
    assert bundle.source == {"trial": 4} and bundle.views == 5
    # pretrained: true in the config, yet nothing is fetched: the bundle's weights are used.
    loaded = load_model(bundle, good, torch.device("cpu"))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    with zipfile.ZipFile(good) as zf:
        meta, weights = json.loads(zf.read(BUNDLE_JSON)), zf.read(WEIGHTS)

    def variant(name: str, entries: dict[str, bytes | str]) -> Path:
        path = tmp_path / name
        with zipfile.ZipFile(path, "w") as zf:
            for entry, data in entries.items():
                zf.writestr(entry, data)
        return path

    cases = {
        "no-json.zip": ({WEIGHTS: weights}, "not a kmnist_sweep model bundle (no bundle.json)"),
        "bad-json.zip": ({BUNDLE_JSON: "{nope", WEIGHTS: weights}, "damaged model bundle"),
        "no-weights.zip": ({BUNDLE_JSON: json.dumps(meta)}, "damaged model bundle (no weights"),
        "bad-weights.zip": (
            {BUNDLE_JSON: json.dumps(meta), WEIGHTS: b"not a tensor file"},
            "damaged model bundle (weights.pt: ",
        ),
        "bad-classes.zip": (
            {BUNDLE_JSON: json.dumps({**meta, "classes": "abc"}), WEIGHTS: weights},
            "damaged model bundle (bundle.json: classes missing or of the wrong type)",
        ),
        "no-format.zip": (
            {BUNDLE_JSON: json.dumps({**meta, "format": None}), WEIGHTS: weights},
            "not a kmnist_sweep model bundle (bundle.json has no format)",
        ),
    }
    for name, (entries, words) in cases.items():
        with pytest.raises(UserError) as info:
            read_bundle(variant(name, entries))
        message = str(info.value)
        assert "\n" not in message and message.startswith(f"{tmp_path / name}: {words}"), message


@pytest.mark.slow
def test_a_rerun_without_a_complete_trial_leaves_no_stale_best_yaml(tmp_path: Path) -> None:
    """A study under the same name in a new storage, whose every trial fails: the first
    study's best.yaml goes, so `final` says so instead of training its trial on this config."""
    made = cli(*TOY_STUDY, cwd=tmp_path)
    assert made.returncode == 0 and (tmp_path / "sweeps/lr-synthetic/best.yaml").is_file()
    again = [*TOY_STUDY, "study.storage=sqlite:///storage/again.db"]
    failing = cli(*again, "+toy.raise_trials=all", "study.max_failed=2", cwd=tmp_path)
    assert failing.returncode == 1, failing.stderr[-3000:]
    assert not (tmp_path / "sweeps/lr-synthetic/best.yaml").exists()
    final = cli("final", "sweeps/lr-synthetic", cwd=tmp_path)
    assert final.returncode == 2 and final.stderr.strip() == (
        "kmnist_sweep: error: sweeps/lr-synthetic/best.yaml: missing (the best trial; no trial "
        "has completed yet?)"
    ), final.stderr[-3000:]
