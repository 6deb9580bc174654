"""The KMNIST sample shipped inside the package: the official bytes, its licence beside it,
found by `data=kmnist_sample` from any folder, and named when the full data is missing."""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

import kmnist_sweep  # noqa: F401  (torchvision compat first)
from kmnist_sweep.data import download
from kmnist_sweep.data.datasets import KMNIST_CLASSES, load_dataset
from kmnist_sweep.data.formats import read_idx
from kmnist_sweep.errors import DataError
from tests.conftest import REPO, SHARED_KMNIST

SAMPLE = REPO / "kmnist_sweep" / "data" / "sample"
FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def sample_cfg(**overrides: object) -> OmegaConf:
    cfg = OmegaConf.create(
        {"seed": 0, "data": OmegaConf.load(REPO / "conf" / "data" / "kmnist_sample.yaml")}
    )
    for key, value in overrides.items():
        OmegaConf.update(cfg, f"data.{key}", value)
    return cfg.data


def test_the_bundled_files_are_the_official_ones() -> None:
    assert SAMPLE.resolve() == download.SAMPLE_DIR
    for name in FILES:
        path = SAMPLE / name
        assert path.stat().st_size == download.BYTES[name]
        assert md5(path) == download.MD5[name]
    # The published sums, written out here too: a changed table must not bless changed files.
    assert md5(SAMPLE / FILES[0]) == "5c965bf0a639b31b8f53240b1b52f4d7"
    assert md5(SAMPLE / FILES[1]) == "7320c461ea6c1c855c0b718fb2a4b134"


@pytest.mark.skipif(not SHARED_KMNIST.is_dir(), reason=f"no second copy in {SHARED_KMNIST}")
def test_the_bundled_files_match_the_shared_copy() -> None:
    for name in FILES:
        assert md5(SAMPLE / name) == md5(SHARED_KMNIST / name)


def test_licence_and_attribution_sit_beside_the_files() -> None:
    licence = (SAMPLE / "LICENSE.txt").read_text()
    readme = (SAMPLE / "README.md").read_text()
    for text in (licence, readme):
        assert "CC BY-SA 4.0" in text
        assert '"KMNIST Dataset" (created by CODH)' in text
        assert "doi:10.20676/00000341" in text and "arXiv:1812.01718" in text
    assert "not** the official benchmark protocol" in readme


def test_the_wheel_ships_the_sample() -> None:
    # [tool.setuptools.package-data]'s one line (tomllib is Python 3.11+, we support 3.10)
    text = (REPO / "pyproject.toml").read_text().split("[tool.setuptools.package-data]")[1]
    line = next(x for x in text.splitlines() if x.startswith("kmnist_sweep = "))
    patterns = ast.literal_eval(line.split("=", 1)[1].strip())
    shipped = {p.name for pattern in patterns for p in (REPO / "kmnist_sweep").glob(pattern)}
    assert {*FILES, "LICENSE.txt", "README.md"} <= shipped


def test_kmnist_sample_defaults_to_the_bundled_copy_from_any_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # nothing here, nothing at ../shared
    cfg = sample_cfg()
    assert cfg.root is None
    dataset = load_dataset(cfg)
    assert dataset.files == tuple(SAMPLE.resolve() / name for name in FILES)
    assert dataset.classes == KMNIST_CLASSES
    assert (len(dataset.train), len(dataset.valid), len(dataset.test)) == (7200, 800, 2000)
    assert "not the official benchmark protocol" in dataset.note
    assert list(tmp_path.iterdir()) == []  # no stamp or split file written anywhere
    assert not (SAMPLE / download.STAMP_FILE).exists()
    # The held-out test part is 200 of each class of the official images.
    images = read_idx(SAMPLE / FILES[0])
    rows = {bytes(row) for row in images.reshape(len(images), -1)}
    held_out = dataset.test.images.reshape(len(dataset.test), -1).numpy()
    assert all(bytes(row) in rows for row in held_out)
    assert np.bincount(dataset.test.labels.numpy()).tolist() == [200] * 10


def test_missing_full_kmnist_names_the_bundled_sample(tmp_path: Path) -> None:
    cfg = OmegaConf.create({"seed": 0, "data": OmegaConf.load(REPO / "conf/data/kmnist.yaml")})
    cfg.data.root, cfg.data.download = str(tmp_path), False
    with pytest.raises(DataError) as info:
        load_dataset(cfg.data)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("missing train-images-idx3-ubyte.gz")
    assert message.endswith(
        "or set data.root to where they are; offline, data=kmnist_sample trains on the "
        "official KMNIST test images bundled with kmnist_sweep (split 80/20, not the "
        "official protocol)"
    )


def test_a_failed_download_names_the_bundled_sample(tmp_path: Path) -> None:
    """data.download=true with the hosts unreachable: a closed local port stands for them."""
    cfg = OmegaConf.create({"seed": 0, "data": OmegaConf.load(REPO / "conf/data/kmnist.yaml")})
    cfg.data.root, cfg.data.mirror = str(tmp_path), "http://127.0.0.1:1/kmnist/"
    with pytest.raises(DataError) as info:
        load_dataset(cfg.data)
    assert "download failed" in str(info.value)
    assert "offline, data=kmnist_sample" in str(info.value)
