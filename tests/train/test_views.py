"""Test-time views (train/views.py): shifted copies, averaged softmax, and the paths that use
them: the single run's test metrics, `final`'s bundle and `predict`."""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

import kmnist_sweep  # noqa: F401  (torchvision compat first)
from kmnist_sweep.data.datasets import load_dataset
from kmnist_sweep.errors import UserError
from kmnist_sweep.results.bundle import (
    BUNDLE_JSON,
    WEIGHTS,
    make_bundle,
    read_bundle,
    write_bundle,
)
from kmnist_sweep.results.predict import probabilities
from kmnist_sweep.train import engine
from kmnist_sweep.train.loader import to_input
from kmnist_sweep.train.model import build_model
from kmnist_sweep.train.views import SHIFTS, class_probabilities, shift_images, split_metrics
from tests.conftest import run_cli

FAST = ("data=synthetic", "trainer.batch_size=64", "trainer.eval_batch_size=256")
CPU_ONLY = "trainer.device=cpu"  # the test compares against CPU tensors, GPU or not
CPU = torch.device("cpu")


def test_a_shift_moves_the_pixels_and_brings_in_black() -> None:
    images = torch.arange(1, 2 * 4 * 5 + 1, dtype=torch.uint8).reshape(2, 4, 5)
    down = shift_images(images, 1, 0)
    assert torch.equal(down[:, 1:], images[:, :-1]) and not down[:, 0].any()
    up_left = shift_images(images, -1, -2)
    assert torch.equal(up_left[:, :-1, :-2], images[:, 1:, 2:])
    assert not up_left[:, -1].any() and not up_left[:, :, -2:].any()
    assert shift_images(images, 0, 0) is images


def _model(classes: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(
        OmegaConf.create({"arch": "resnet18", "stem": "small", "pretrained": False}), classes
    )


@pytest.mark.parametrize("views", [1, 5, 9])
def test_views_average_the_softmax_of_the_first_shifts(views: int) -> None:
    model = _model().train()
    images = torch.randint(0, 256, (6, 28, 28), dtype=torch.uint8)
    got = class_probabilities(model, images, 0.2, 0.3, views=views, device=CPU, batch=4)
    assert model.training  # the mode the caller had
    model.eval()
    with torch.no_grad():
        each = [
            model(to_input(shift_images(images, *shift), 0.2, 0.3)).softmax(-1)
            for shift in SHIFTS[:views]
        ]
    assert torch.allclose(got, torch.stack(each).mean(0), atol=1e-6)
    assert torch.allclose(got.sum(-1), torch.ones(6), atol=1e-5)
    if views > 1:  # the views are really other inputs
        assert not torch.allclose(got, each[0], atol=1e-4)


def test_split_metrics_count_from_the_averaged_probabilities() -> None:
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.9, 0.1], [0.2, 0.8]])
    labels = torch.tensor([0, 0, 0, 1])  # 2 of 3 zeros right, the one 1 right
    metrics = split_metrics(probs, labels, 2, "test")
    assert metrics["test/acc"] == pytest.approx(0.75)
    assert metrics["test/bacc"] == pytest.approx((2 / 3 + 1) / 2)
    expected_loss = -torch.tensor([0.7, 0.4, 0.9, 0.8]).log().mean()
    assert metrics["test/loss"] == pytest.approx(float(expected_loss))
    assert metrics["test/images"] == 4


def test_the_engines_test_metrics_use_the_configs_views(
    compose_cfg: Callable[..., DictConfig],
) -> None:
    """One view agrees with fastai's own accuracy on the test loader; five are the averaged
    probabilities of the trained model."""
    cfg = compose_cfg(*FAST, CPU_ONLY, "trainer.epochs=1", "trainer.test_views=1")
    data = load_dataset(cfg.data)
    learn = engine.build_learner(cfg, data)
    one = engine.train(cfg, data, learn=learn, test=True, quiet=True).test
    assert one["test/acc"] == pytest.approx(engine.evaluate(learn, 2, "test")["test/acc"])
    five = engine.test_metrics(learn, 5, data.num_classes)
    dl = learn.dls.train
    probs = class_probabilities(
        learn.model, data.test.images, dl.mean, dl.std, views=5, device=CPU, batch=7
    )
    assert five == pytest.approx(split_metrics(probs, data.test.labels, data.num_classes, "test"))
    assert set(one) == {"test/loss", "test/acc", "test/bacc", "test/images"}


@pytest.mark.slow
def test_the_cli_says_how_many_views(tmp_path: Path) -> None:
    """(A count it does not offer is a bad-input case: docs/bad-input.md.)"""
    out = run_cli("data=synthetic", "trainer.epochs=0", "trainer.test_views=9", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"^final: val/acc [\d.]+  test/acc [\d.]+ \(9 views\)", out.stdout, re.M)


def _bundle(tmp_path: Path, views: int) -> Path:
    path = tmp_path / f"views{views}.zip"
    cfg = OmegaConf.create({"model": {"arch": "resnet18", "stem": "small", "pretrained": False}})
    bundle = make_bundle(
        cfg,
        classes=list("あいうえ"),
        image_size=28,
        mean=0.2,
        std=0.3,
        views=views,
        model=_model(),
        data_name="synthetic",
        note="",
        files=(),
        source={},
    )
    write_bundle(path, bundle)
    return path


def test_predict_averages_the_views_its_bundle_names(tmp_path: Path) -> None:
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    model = _model().eval()
    for views in (1, 5):
        bundle = read_bundle(_bundle(tmp_path, views))
        assert bundle.views == views
        expected = class_probabilities(model, images, 0.2, 0.3, views=views, device=CPU, batch=2)
        assert torch.allclose(probabilities(model, bundle, images, CPU), expected, atol=1e-6)


def test_a_format_1_bundle_is_one_view_and_a_wrong_count_is_damage(tmp_path: Path) -> None:
    good = _bundle(tmp_path, 5)
    with zipfile.ZipFile(good) as zf:
        meta, weights = json.loads(zf.read(BUNDLE_JSON)), zf.read(WEIGHTS)
    assert meta["format_version"] == 2 and meta["views"] == 5
    old = {k: v for k, v in meta.items() if k != "views"} | {"format_version": 1}
    cases = {"old.zip": old, **{f"bad{v}.zip": meta | {"views": v} for v in (3, 5.0, True)}}
    for name, changed in cases.items():
        with zipfile.ZipFile(tmp_path / name, "w") as zf:
            zf.writestr(BUNDLE_JSON, json.dumps(changed))
            zf.writestr(WEIGHTS, weights)
    assert read_bundle(tmp_path / "old.zip").views == 1  # written before views existed
    for name in ("bad3.zip", "bad5.0.zip", "badTrue.zip"):
        with pytest.raises(UserError, match=r"damaged model bundle \(bundle.json: views missing"):
            read_bundle(tmp_path / name)
