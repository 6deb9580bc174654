"""Batch-size rules and the OOM / divergence fallback, with real errors on CPU."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf

from kmnist_sweep.config.check import check_batch_sizes
from kmnist_sweep.config.schema import SCHEMA
from kmnist_sweep.data.datasets import load_dataset
from kmnist_sweep.errors import ConfigError
from kmnist_sweep.results.batchsize import (
    SizeAnswer,
    SizeRow,
    recommend,
    size_answer,
    size_table,
)
from kmnist_sweep.results.batchsize_plot import BUDGET_TITLE, plot_sizes
from kmnist_sweep.train import batch_size, engine
from tests.conftest import run_cli


def check_batch(value: object) -> None:
    """trainer.batch_size=value through the one config check (batch_size.min 16, max 4096)."""
    cfg = OmegaConf.create(
        {"trainer": {"batch_size": value}, "batch_size": {"min": 16, "max": 4096}}
    )
    rule = SCHEMA["trainer.batch_size"]
    rule.check("trainer.batch_size", cfg.trainer.batch_size)
    check_batch_sizes(OmegaConf.merge(cfg, {"lr_finder": {"batch_size": 16}}), None)


@pytest.mark.parametrize("value", [16, 32, 128, 4096])
def test_powers_of_two_in_range_pass(value: int) -> None:
    check_batch(value)


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (96, "not a power of two"),
        (0, "is not a whole number >= 1"),
        (8, "outside"),
        (8192, "outside"),
        ("128", "is not a whole number >= 1"),
        (True, "is not a whole number >= 1"),
    ],
)
def test_bad_batch_sizes_are_config_errors(value: object, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        check_batch(value)


def test_fallback_halves_on_oom_and_records_why() -> None:
    calls: list[int] = []

    def run(bs: int) -> str:
        calls.append(bs)
        if bs > 128:
            raise torch.OutOfMemoryError(f"no room for {bs}")
        return f"done at {bs}"

    record = batch_size.Fallback(512)
    result = batch_size.fit_with_fallback(run, record, 16)
    assert result == "done at 128" and calls == [512, 256, 128]
    assert record.effective == 128 and record.requested == 512 and record.fitted
    assert [(h.from_bs, h.to_bs, h.cause) for h in record.halvings] == [
        (512, 256, "oom"),
        (256, 128, "oom"),
    ]


def test_fallback_gives_up_below_the_minimum() -> None:
    def run(bs: int) -> None:
        raise batch_size.Diverged("loss is nan at epoch 1 step 2")

    record = batch_size.Fallback(64)
    with pytest.raises(batch_size.BatchSizeExhausted, match="diverged at batch 32.*min=32"):
        batch_size.fit_with_fallback(run, record, 32)
    assert record.effective == 32 and not record.fitted


def test_other_errors_are_not_swallowed() -> None:
    def run(bs: int) -> None:
        raise KeyError("bug")

    record = batch_size.Fallback(64)
    with pytest.raises(KeyError):
        batch_size.fit_with_fallback(run, record, 16)
    assert record.effective == 64 and record.fitted  # the record says where it failed


@pytest.mark.slow
def test_injected_oom_in_real_training_halves_twice(
    compose_cfg: Callable[..., DictConfig],
) -> None:
    # 2,304 images, 2,074 of them for training: 4 steps per epoch at batch 512 (the last,
    # partial batch is dropped), so step 3 of epoch 2 exists.
    cfg = compose_cfg(
        "data=synthetic",
        "data.n_train=2304",
        "data.image_size=16",
        "trainer.epochs=2",
        "debug.inject_oom={above: 128, epoch: 2, step: 3}",
    )
    data = load_dataset(cfg.data)
    attempts: list[int] = []

    def run(bs: int) -> engine.TrainResult:
        attempts.append(bs)
        learn = engine.build_learner(cfg, data, batch_size=bs)
        return engine.train(cfg, data, learn=learn, quiet=True, cbs=batch_size.guards(cfg))

    record = batch_size.Fallback(512)
    result = batch_size.fit_with_fallback(run, record, 16)
    assert attempts == [512, 256, 128]
    assert record.effective == 128 and len(record.halvings) == 2
    assert all("epoch 2 step 3" in h.detail for h in record.halvings), record.halvings
    assert len(result.history) == 2


def test_huge_lr_diverges(compose_cfg: Callable[..., DictConfig]) -> None:
    cfg = compose_cfg("data=synthetic", "trainer.epochs=2", "trainer.lr=1000")
    data = load_dataset(cfg.data)
    learn = engine.build_learner(cfg, data, batch_size=32)
    with pytest.raises(batch_size.Diverged):
        engine.train(cfg, data, learn=learn, quiet=True, cbs=batch_size.guards(cfg))


def test_guard_leaves_healthy_training_alone(compose_cfg: Callable[..., DictConfig]) -> None:
    cfg = compose_cfg("data=synthetic", "trainer.epochs=1")
    data = load_dataset(cfg.data)
    learn = engine.build_learner(cfg, data, batch_size=32)
    result = engine.train(cfg, data, learn=learn, quiet=True, cbs=batch_size.guards(cfg))
    assert len(result.history) == 1


@pytest.mark.slow
def test_a_halved_size_is_shown_as_halved_never_as_its_own_answer(tmp_path: Path) -> None:
    """A batch-size sweep (32, 64, 128) through the CLI where 128 runs out of memory on its
    first step (injected) and trains at 64: the answer, the report's table and the figure
    give 128 no figure of its own, and it cannot be recommended for 64's speed."""
    out = run_cli(
        "+sweep=batchsize",
        "data=synthetic",
        "data.n_train=1024",
        "data.image_size=16",
        "trainer.epochs=1",
        "++search_space.trainer.batch_size.high=128",
        "batch_size.min_steps=0",
        "study.n_trials=3",
        "lr_finder.num_it=20",
        "debug.inject_oom={above: 64, epoch: 1, step: 1}",
        "tracking=disabled",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    answer = re.search(r"^Recommended batch size: (\d+)\. .*$", out.stdout, re.M)
    assert answer, out.stdout[-3000:]
    assert answer[1] in {"32", "64"}
    assert "halved, so not measured at their own size: 128 (oom -> 64)" in answer[0]
    html = (tmp_path / "sweeps" / "batchsize-synthetic" / "report" / "report.html").read_text()
    assert re.search(r"<td>128</td>\s*<td>64 \(oom\)</td>", html), html[-4000:]

    storage = f"sqlite:///{tmp_path / 'storage' / 'batchsize-synthetic.db'}"
    study = optuna.load_study(study_name="batchsize-synthetic", storage=storage)
    found = size_answer(study, "val/acc")
    assert found is not None and found.pick is not None
    [halved] = [r for r in found.rows if r.requested == 128]
    assert (halved.effective, halved.halved_by, halved.measured) == (64, "oom", False)
    budget, speed = _budget_axes(plot_sizes(found))
    accuracy, halved_marks = budget.lines[:2]
    assert list(accuracy.get_xdata()) == [32, 64]  # 128 has no accuracy of its own
    assert list(halved_marks.get_xdata()) == [128]
    assert list(speed.lines[0].get_xdata()) == [32, 64]  # nor a speed


def _budget_axes(fig: Figure) -> tuple[Axes, Axes]:
    """The figure's accuracy-at-the-budget axes and the speed axes sharing its x."""
    [budget] = [ax for ax in fig.axes if ax.get_title() == BUDGET_TITLE]
    [speed] = [
        ax for ax in fig.axes if ax is not budget and ax.get_shared_x_axes().joined(ax, budget)
    ]
    return budget, speed


def size_row(
    requested: int, effective: int, halved_by: str | None, fitted: bool = True
) -> SizeRow:
    value = 0.95 if fitted else None
    outcome = "trained" if halved_by is None else "halved" if fitted else "did not fit (oom)"
    curve = [{"epoch": 1.0, "steps": 10.0, "seconds": 1.0, "val/acc": 0.95}] if fitted else []
    return SizeRow(
        requested, effective, outcome, value, 500.0, 10.0, 1500.0, 0.05, halved_by, curve=curve
    )


def test_a_size_that_fitted_nowhere_is_not_drawn_as_halved() -> None:
    """2048 ran out of memory down to batch_size.min: it did not train at all, so it is no
    halved size (the table says "did not fit"), and the answer comes from the others."""
    rows = [size_row(64, 64, None), size_row(128, 64, "oom"), size_row(2048, 16, "oom", False)]
    pick = recommend(rows)
    assert pick is not None and pick.batch_size == 64
    assert "not measured at their own size: 128 (oom -> 64)" in pick.rule
    assert pick.rule.endswith("not counted: 2048 (did not fit (oom))")
    budget, _ = _budget_axes(plot_sizes(SizeAnswer(rows, pick, "val/acc")))
    assert list(budget.lines[1].get_xdata()) == [128]
    table = size_table(SizeAnswer(rows, pick, "val/acc"))
    assert [r[1] for r in table[1:]] == ["64", "64 (oom)", "did not fit (oom)"]
