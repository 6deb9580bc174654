"""LR finder: pure suggestion rules on synthetic curves, and the range test on the engine."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from kmnist_sweep.data.datasets import load_dataset
from kmnist_sweep.errors import ConfigError
from kmnist_sweep.train import engine, lr_finder

LRS = [10 ** (-7 + 0.1 * i) for i in range(81)]  # 1e-7 .. 1e1 in steps of 10**0.1


def test_minimum_is_a_tenth_of_the_lowest_point() -> None:
    losses = [(math.log10(lr) + 2) ** 2 for lr in LRS]  # lowest at lr = 1e-2 (i = 50)
    assert lr_finder.suggest_minimum(LRS, losses) == pytest.approx(1e-3)


def test_minimum_ignores_a_nan_tail() -> None:
    losses = [(math.log10(lr) + 2) ** 2 for lr in LRS]
    losses[60:] = [0.0 if i % 2 else math.nan for i in range(21)]  # NaN first, then fake lows
    assert lr_finder.suggest_minimum(LRS, losses) == pytest.approx(1e-3)


def test_valley_on_a_known_valley() -> None:
    # Strictly falling for i = 0..50, rising after: the falling run is 51 points long,
    # fastai's rule takes start = 50 - 51 = -1, third = 17 -> index -1 + 17 + 8 = 24.
    losses = [abs(i - 50) + 1.0 for i in range(81)]
    assert lr_finder.suggest_valley(LRS, losses) == LRS[24]


def test_valley_on_a_flat_curve_and_nan_tail() -> None:
    flat = [2.3] * 81
    assert lr_finder.suggest_valley(LRS, flat) == LRS[0]
    assert lr_finder.suggest_minimum(LRS, flat) == pytest.approx(LRS[0] / 10)
    falling_then_nan = [10.0 - i for i in range(10)] + [math.nan] * 71
    # falls over i = 0..9: start -1, third 3 -> index -1 + 3 + 1 = 3
    assert lr_finder.suggest_valley(LRS, falling_then_nan) == LRS[3]


def test_suggest_trims_like_fastai() -> None:
    losses = [(math.log10(lr) + 2) ** 2 for lr in LRS]
    losses[:8] = [-1.0] * 8  # within the first tenth: dropped as EWMA warm-up
    assert lr_finder.suggest(LRS, losses, "minimum") == pytest.approx(1e-3)
    with pytest.raises(ConfigError, match="lr_finder.suggestion"):
        lr_finder.suggest(LRS, losses, "steep")


def test_bottom_is_the_minimum_and_auto_picks_a_rule_per_optimiser(
    compose_cfg: Callable[..., DictConfig],
) -> None:
    losses = [(math.log10(lr) + 2) ** 2 for lr in LRS]  # bottoms out at 1e-2
    assert lr_finder.suggest(LRS, losses, "bottom") == pytest.approx(1e-2)
    assert lr_finder.suggest(LRS, losses, "minimum") == pytest.approx(1e-3)
    assert compose_cfg().lr_finder.suggestion == "auto"  # the shipped default
    assert lr_finder.rule_for(compose_cfg("trainer.optimizer=adamw")) == "minimum"
    assert lr_finder.rule_for(compose_cfg("trainer.optimizer=sgd")) == "bottom"
    chosen = compose_cfg("trainer.optimizer=sgd", "lr_finder.suggestion=valley")
    assert lr_finder.rule_for(chosen) == "valley"  # a named rule wins
    # A curve cached by a version without `bottom` still answers for it.
    old = lr_finder.Curve(LRS, losses, 128, {"minimum": 1e-3})
    assert lr_finder.Curve.from_json(old.to_json()).lr("bottom") == pytest.approx(1e-2)


def test_no_finite_loss_is_an_error() -> None:
    with pytest.raises(ValueError, match="no finite loss"):
        lr_finder.suggest_minimum(LRS[:3], [math.nan] * 3)


def test_scale_lr() -> None:
    assert lr_finder.scale_lr(1e-3, 128, 512, "linear") == pytest.approx(4e-3)
    assert lr_finder.scale_lr(1e-3, 128, 512, "sqrt") == pytest.approx(2e-3)
    with pytest.raises(ConfigError):
        lr_finder.scale_lr(1e-3, 128, 512, "cube")


def test_range_test_restores_weights_and_records_a_curve(
    compose_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    cfg = compose_cfg("data=synthetic", "data.n_train=1024", "lr_finder.num_it=30")
    data = load_dataset(cfg.data)
    learn = engine.build_learner(cfg, data, batch_size=64)
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    lrs, losses = lr_finder.range_test(learn, cfg.lr_finder)
    after = learn.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "weights not restored"
    assert 5 < len(lrs) <= 30 and len(lrs) == len(losses)
    assert lrs == sorted(lrs) and lrs[0] == pytest.approx(1e-7, rel=0.5)
    assert not (Path.cwd() / "models" / "_tmp.pth").exists()
    curve = lr_finder.Curve(lrs, losses, 64, {"valley": lr_finder.suggest(lrs, losses, "valley")})
    assert lr_finder.Curve.from_json(curve.to_json()) == curve
    png = lr_finder.plot_curve(curve, tmp_path / "curve.png", chosen="valley")
    csv = lr_finder.save_csv(curve, tmp_path / "curve.csv")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(csv.read_text().splitlines()) == len(lrs) + 1


def test_curve_key_changes_with_what_the_curve_depends_on(
    compose_cfg: Callable[..., DictConfig],
) -> None:
    cfg = compose_cfg("data=synthetic")
    base = lr_finder.curve_key(cfg, 128)
    assert lr_finder.curve_key(cfg, 256) != base
    assert lr_finder.curve_key(compose_cfg("data=synthetic", "model=resnet34"), 128) != base
    assert lr_finder.curve_key(compose_cfg("data=synthetic", "model.stem=small"), 128) != base
    assert lr_finder.curve_key(compose_cfg("data=synthetic", "trainer.lr=1"), 128) == base
    for other in (
        "trainer.optimizer=adamw",
        "trainer.weight_decay=0.001",
        "trainer.momentum=0.8",
        "trainer.label_smoothing=0",
        "model.pretrained=true",
    ):
        assert lr_finder.curve_key(compose_cfg("data=synthetic", other), 128) != base, other
