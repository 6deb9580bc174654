"""The training engine: device loader, augmentation, fastai training on synthetic data."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from omegaconf import DictConfig

from kmnist_sweep.config.check import check_config
from kmnist_sweep.data.datasets import Dataset, Split, load_dataset
from kmnist_sweep.errors import ConfigError, DataError
from kmnist_sweep.train import engine
from kmnist_sweep.train import loader as train_loader

FAST = ("data=synthetic", "trainer.batch_size=64", "trainer.eval_batch_size=256")


@pytest.fixture
def synthetic(compose_cfg: Callable[..., DictConfig]) -> tuple[DictConfig, Dataset]:
    cfg = compose_cfg(*FAST, "trainer.epochs=2")
    return cfg, load_dataset(cfg.data)


def _loader(n: int, bs: int, shuffle: bool, seed: int = 0) -> train_loader.DeviceLoader:
    split = Split(torch.zeros(n, 8, 8, dtype=torch.uint8), torch.arange(n))
    return train_loader.DeviceLoader(
        split, bs, torch.device("cpu"), shuffle=shuffle, seed=seed, mean=0.5, std=0.25
    )


@pytest.mark.parametrize(("n", "bs"), [(1000, 128), (129, 64), (64, 64), (5, 128)])
def test_loader_yields_every_index_once_per_epoch(n: int, bs: int) -> None:
    loader = _loader(n, bs, shuffle=True)
    orders = []
    for _ in range(3):
        seen = torch.cat([y for _, y in loader])
        assert sorted(seen.tolist()) == list(range(n))
        assert all(len(y) <= bs for _, y in loader)
        orders.append(seen)
    if n > 5:
        assert not torch.equal(orders[0], orders[1]), "each epoch must have its own order"


def test_loader_batches_have_no_stragglers() -> None:
    # 129 images at batch 64 must not leave a one-image batch (BatchNorm cannot train on it).
    sizes = [len(y) for _, y in _loader(129, 64, shuffle=True)]
    assert min(sizes) >= 43 and sum(sizes) == 129


def test_loader_order_is_seeded() -> None:
    a = torch.cat([y for _, y in _loader(300, 32, shuffle=True, seed=7)])
    b = torch.cat([y for _, y in _loader(300, 32, shuffle=True, seed=7)])
    c = torch.cat([y for _, y in _loader(300, 32, shuffle=True, seed=8)])
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_loader_normalises() -> None:
    split = Split(torch.full((4, 2, 2), 255, dtype=torch.uint8), torch.zeros(4, dtype=torch.long))
    loader = train_loader.DeviceLoader(
        split, 4, torch.device("cpu"), shuffle=False, seed=0, mean=0.5, std=0.25
    )
    x, _ = next(iter(loader))
    assert x.shape == (4, 1, 2, 2) and torch.allclose(x, torch.full_like(x, 2.0))


@pytest.mark.parametrize("shape", [(3000, 28, 28), (5, 64, 64), (1, 1, 2)])
def test_pixel_stats_equal_the_float_statistics(shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    images[0, 0, 0], images[-1, -1, -1] = 255, 0  # both ends of the range are counted
    floats = images.double() / 255
    mean, std = train_loader.pixel_stats(images)
    assert mean == pytest.approx(float(floats.mean()), abs=1e-12)
    assert std == pytest.approx(float(floats.std()), abs=1e-12)


def test_loaders_standardise_by_the_training_split(
    synthetic: tuple[DictConfig, Dataset], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, dataset = synthetic
    floats = dataset.train.images.double() / 255
    whole = dataset.train.images.numel()
    converted: list[int] = []  # sizes of every tensor made float while the loaders are built
    for name in ("float", "double", "to"):
        original = getattr(torch.Tensor, name)

        def spy(self: torch.Tensor, *args: Any, _original: Any = original, **kw: Any) -> Any:
            out = _original(self, *args, **kw)
            if out.is_floating_point() and not self.is_floating_point():
                converted.append(self.numel())
            return out

        monkeypatch.setattr(torch.Tensor, name, spy)
    dls = train_loader.make_loaders(dataset, cfg.trainer, 32, torch.device("cpu"), 0)
    monkeypatch.undo()
    assert not [n for n in converted if n >= whole], "the training split was copied as floats"
    for dl in (dls.train, dls.valid, dls[2]):
        assert dl.mean == pytest.approx(float(floats.mean()), abs=1e-9)
        assert dl.std == pytest.approx(float(floats.std()), abs=1e-9)


@pytest.mark.parametrize(("size", "expected"), [(28, 256), (64, 32)])
def test_auto_eval_batches_hold_a_fixed_number_of_pixels(
    compose_cfg: Callable[..., DictConfig], size: int, expected: int
) -> None:
    cfg = compose_cfg(
        "data=synthetic", f"data.image_size={size}", "data.n_train=300", "data.n_test=300"
    )
    assert cfg.trainer.eval_batch_size == "auto"  # the shipped default
    check_config(cfg)
    dls = train_loader.make_loaders(
        load_dataset(cfg.data), cfg.trainer, 32, torch.device("cpu"), 0
    )
    assert dls.valid.bs == dls[2].bs == expected
    assert len(dls[2]) == -(-300 // expected)  # the test split in steps of that many images
    fixed = compose_cfg("data=synthetic", f"data.image_size={size}", "trainer.eval_batch_size=96")
    dls = train_loader.make_loaders(
        load_dataset(fixed.data), fixed.trainer, 32, torch.device("cpu"), 0
    )
    assert dls.valid.bs == 96  # a number is taken as given


def test_pixel_stats_refuse_an_empty_split() -> None:
    with pytest.raises(DataError, match="too few"):
        train_loader.pixel_stats(torch.zeros((0, 28, 28), dtype=torch.uint8))


def _shifts(img: torch.Tensor, t: int) -> list[torch.Tensor]:
    padded = torch.nn.functional.pad(img, (t, t, t, t))
    h, w = img.shape[-2:]
    return [
        padded[..., dy : dy + h, dx : dx + w]
        for dy, dx in itertools.product(range(2 * t + 1), repeat=2)
    ]


def test_augmentation_only_shifts_never_flips() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 12, 12, generator=gen)  # random images are asymmetric
    out = train_loader.shift_batch(x, 2, gen)
    assert out.shape == x.shape
    moved = 0
    for src, dst in zip(x, out, strict=True):
        matches = [torch.equal(s, dst) for s in _shifts(src, 2)]
        assert any(matches), "augmented image is not a shift of its source"
        assert not torch.equal(dst, src.flip(-1)) and not torch.equal(dst, src.flip(-2))
        moved += not torch.equal(dst, src)
    assert moved > 32, "translations should move most images"


def test_cutout_zeroes_a_square() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.ones(16, 1, 20, 20)
    out = train_loader.cutout_batch(x, 6, gen)
    zeros = (out == 0).sum(dim=(1, 2, 3))
    assert (zeros > 0).all() and (zeros <= 36).all()


def test_shifts_bring_in_background_and_cutout_the_mean(
    compose_cfg: Callable[..., DictConfig],
) -> None:
    # White pages with one black pixel, through the loaders a learner gets: rows a shift
    # brings in are the scan's black, standardised (padding the standardised batch made
    # them 0, the mean grey, an edge no test image has); cutout's hole is that mean grey.
    cfg = compose_cfg("data=synthetic", "trainer.translate=2", "trainer.cutout=6")
    images = torch.full((64, 12, 12), 255, dtype=torch.uint8)
    images[:, 0, 0] = 0
    split = Split(images, torch.arange(64) % 4)
    data = Dataset("pages", list("abcd"), split, split, split, "acc", "")
    dls = train_loader.make_loaders(data, cfg.trainer, 64, torch.device("cpu"), 0)
    x, _ = next(iter(dls.train))
    white = torch.tensor((1 - dls.train.mean) / dls.train.std)
    black = torch.tensor(-dls.train.mean / dls.train.std)
    is_white, is_black, is_hole = torch.isclose(x, white), torch.isclose(x, black), x == 0
    assert (is_white | is_black | is_hole).all(), "a pixel is neither page, ink nor hole"
    assert is_black.sum() > 64 * 10, "shifts should bring in rows of background"
    assert (is_hole.sum(dim=(1, 2, 3)) > 0).all(), "every image gets a cutout hole"
    clean, _ = next(iter(dls.valid))  # evaluation images are never augmented
    assert torch.isclose(clean, white).sum() == 64 * 143


def test_short_training_lowers_the_loss(
    compose_cfg: Callable[..., DictConfig], synthetic: tuple[DictConfig, Dataset]
) -> None:
    # 16 steps: SGD at the default's 0.07 (tuned for 10 epochs of real data) leaves the
    # BatchNorm statistics too unsettled for the validation loss to fall this early.
    cfg, data = compose_cfg(*FAST, "trainer.epochs=2", "trainer.lr=0.01"), synthetic[1]
    untrained = engine.evaluate(engine.build_learner(cfg, data), 1, "val")
    result = engine.train(cfg, data, quiet=True)
    assert len(result.history) == 2
    assert result.valid["val/loss"] < untrained["val/loss"]
    assert result.history[-1]["train/loss"] < result.history[0]["train/loss"] * 1.05
    assert result.valid["val/acc"] > 1.5 / data.num_classes  # well above chance


def test_epoch_hook_sees_every_epoch(synthetic: tuple[DictConfig, Dataset]) -> None:
    cfg, data = synthetic
    seen: list[int] = []
    engine.train(cfg, data, lambda epoch, m: seen.append(epoch), quiet=True)
    assert seen == [1, 2]


def test_hook_exception_stops_training(synthetic: tuple[DictConfig, Dataset]) -> None:
    cfg, data = synthetic

    class Stop(Exception):
        pass

    def hook(epoch: int, metrics: dict[str, float]) -> None:
        raise Stop(epoch)

    with pytest.raises(Stop):
        engine.train(cfg, data, hook, quiet=True)


def test_zero_epochs_evaluates_without_training(
    compose_cfg: Callable[..., DictConfig],
) -> None:
    cfg = compose_cfg(*FAST, "trainer.epochs=0")
    data = load_dataset(cfg.data)
    learn = engine.build_learner(cfg, data)
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    result = engine.train(cfg, data, learn=learn, test=True, quiet=True)
    after = learn.model.state_dict()
    assert result.history == []
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert set(result.valid) == {"val/loss", "val/acc"}
    assert set(result.test) == {"test/loss", "test/acc", "test/bacc", "test/images"}


def test_same_seed_same_metrics(compose_cfg: Callable[..., DictConfig]) -> None:
    cfg = compose_cfg(*FAST, "trainer.epochs=1", "trainer.cutout=4")
    data = load_dataset(cfg.data)
    first = engine.train(cfg, data, quiet=True).history
    second = engine.train(cfg, data, quiet=True).history
    for point in first + second:
        del point[engine.TRAIN_SECONDS]  # a clock, not a metric
    assert first == second
    other = engine.train(compose_cfg(*FAST, "trainer.epochs=1", "seed=1"), data, quiet=True)
    assert other.history[0]["train/loss"] != first[0]["train/loss"]


def test_balanced_accuracy_is_mean_recall() -> None:
    metric = engine.BalancedAccuracy(3)

    class Fake:
        pass

    learn = Fake()
    # class 0: 3 of 4 right; class 1: 1 of 1; class 2: 0 of 1 -> (0.75 + 1 + 0) / 3
    learn.pred = torch.eye(3)[torch.tensor([0, 0, 0, 1, 1, 1])]  # type: ignore[attr-defined]
    learn.y = torch.tensor([0, 0, 0, 0, 1, 2])  # type: ignore[attr-defined]
    metric.accumulate(learn)  # type: ignore[arg-type]
    assert metric.value == pytest.approx((0.75 + 1.0 + 0.0) / 3)


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("trainer.device", "tpu", "trainer.device"),
        ("trainer.precision", "fp8", "trainer.precision"),
        ("trainer.optimizer", "lion", "trainer.optimizer"),
        ("trainer.epochs", "31", "0-30"),
        ("model.arch", "resnet101", "model.arch"),
        ("trainer.eval_batch_size", "0", "trainer.eval_batch_size=0 must be >= 1"),
        ("trainer.eval_batch_size", "many", "must be auto or an integer"),
    ],
)
def test_bad_trainer_settings_are_config_errors(
    compose_cfg: Callable[..., DictConfig], key: str, value: str, needle: str
) -> None:
    cfg = compose_cfg(*FAST, "trainer.epochs=1", f"{key}={value}")
    with pytest.raises(ConfigError, match=needle):
        check_config(cfg)  # the one check pass, before any data or training
