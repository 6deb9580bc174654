"""The data layer on the real KMNIST files, on small synthetic files in every release format,
on bad input, and through downloads served from a local HTTP server."""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import logging
import socket
import struct
import tarfile
import threading
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import synth_files as synth
import torch
from omegaconf import DictConfig, OmegaConf

import kmnist_sweep  # noqa: F401  (loads the torchvision shim before anything else)
from kmnist_sweep.data import contract, datasets, download, formats, splits
from kmnist_sweep.data.datasets import Dataset, load_dataset
from kmnist_sweep.errors import DataError

PROJECT = Path(__file__).resolve().parents[2]
CONF = PROJECT / "conf" / "data"
REAL = PROJECT.parent / "shared" / "data" / "kmnist"
# The official md5s, as /work/shared/data/README.md lists them for the files kept there.
REAL_MD5 = {
    "t10k-images-idx3-ubyte.gz": "5c965bf0a639b31b8f53240b1b52f4d7",
    "t10k-labels-idx1-ubyte.gz": "7320c461ea6c1c855c0b718fb2a4b134",
    "train-labels-idx1-ubyte.gz": "e144d726b3acfaa3e44228e80efcd344",
}
needs_real = pytest.mark.skipif(
    not all((REAL / name).is_file() for name in REAL_MD5),
    reason=f"the real KMNIST files are not in {REAL} (see shared/data/README.md)",
)


def data_cfg(option: str, **overrides: Any) -> DictConfig:
    """conf/data/<option>.yaml under a root holding `seed`, as composed (without Hydra: fast)."""
    root = OmegaConf.create({"seed": 0, "data": OmegaConf.load(CONF / f"{option}.yaml")})
    for key, value in overrides.items():
        OmegaConf.update(root, f"data.{key}", value)
    return root.data


def one_line_error(call: Callable[[], object], *names: str) -> str:
    """Run `call`, expect a DataError on one line that mentions every one of `names`."""
    with pytest.raises(DataError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for name in names:
        assert name in message
    return message


def ids(split: contract.Split) -> list[int]:
    return synth.image_ids(split.images)


def assert_partition(dataset: Dataset, expected_ids: set[int]) -> None:
    parts = [ids(dataset.train), ids(dataset.valid), ids(dataset.test)]
    assert sum(len(p) for p in parts) == len(expected_ids)
    assert set().union(*parts) == expected_ids  # so no image is lost or in two parts


def class_counts(split: contract.Split, num_classes: int) -> list[int]:
    return torch.bincount(split.labels, minlength=num_classes).tolist()


def md5_hex(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Facts and configs


def test_class_maps_match_the_releases() -> None:
    kmnist = [0x304A, 0x304D, 0x3059, 0x3064, 0x306A, 0x306F, 0x307E, 0x3084, 0x308C, 0x3092]
    assert [ord(c) for c in datasets.KMNIST_CLASSES] == kmnist
    assert len(datasets.K49_CLASSES) == len(set(datasets.K49_CLASSES)) == 49
    assert datasets.K49_CLASSES[:5] == list("あいうえお")
    assert datasets.K49_CLASSES[43:] == list("わゐゑをんゝ")  # wa wi we wo n, iteration mark
    assert set(datasets.KMNIST_CLASSES) <= set(datasets.K49_CLASSES)


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_data_configs_compose_and_comment_every_key(
    path: Path, compose_cfg: Callable[..., DictConfig]
) -> None:
    cfg = compose_cfg(f"data={path.stem}", "seed=7").data
    assert cfg.name == path.stem and cfg.seed == 7
    assert cfg.metric in ("acc", "bacc")
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    keys = [line for line in path.read_text().splitlines() if line and line[0] not in "# "]
    assert len(keys) == len(cfg)
    assert all(" # " in line for line in keys), "each key needs a trailing comment"


def test_unknown_dataset_name_is_one_line_error() -> None:
    message = one_line_error(lambda: load_dataset(data_cfg("kmnist", name="mnist")), "'mnist'")
    assert "kmnist_sample" in message  # says what would have worked


# ---------------------------------------------------------------------------------------------
# The real KMNIST files, read as a user's download would be


@needs_real
def test_real_files_in_torchvision_layout_verify_and_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = tmp_path / "KMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in REAL_MD5:
        (raw / name).symlink_to(REAL / name)
    names = list(REAL_MD5)
    url = download.OFFICIAL_URL + "kmnist"
    download.ensure_files(raw, names, url, download=False, verify=True)
    assert {name: md5_hex(raw / name) for name in names} == REAL_MD5
    assert {name: download.MD5[name] for name in names} == REAL_MD5

    images = formats.read_idx(raw / "t10k-images-idx3-ubyte.gz")
    labels = formats.read_idx(raw / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10
    train_labels = formats.read_idx(raw / "train-labels-idx1-ubyte.gz")
    assert np.bincount(train_labels).tolist() == [6000] * 10

    # The md5s were checked once; the stamp lets the next check skip the hashing.
    assert set(json.loads((raw / download.STAMP_FILE).read_text())) == set(names)

    def no_hashing(path: Path) -> str:
        raise AssertionError(f"hashed {path} again")

    monkeypatch.setattr(download, "md5_of", no_hashing)
    url = download.OFFICIAL_URL + "kmnist"
    download.ensure_files(raw, names, url, download=False, verify=True)

    # The official train images are not here: the loader says which file, from where, to where.
    cfg = data_cfg("kmnist", root=str(tmp_path), download=False)
    url = download.OFFICIAL_URL + "kmnist/train-images-idx3-ubyte.gz"
    one_line_error(lambda: load_dataset(cfg), "train-images-idx3-ubyte.gz", url, str(raw))


def test_kmnist_sample_real_split_is_stratified_seeded_and_labelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the default (root: null) is the copy inside the package
    sample = download.SAMPLE_DIR
    before = sorted(p.name for p in sample.iterdir())
    dataset = load_dataset(data_cfg("kmnist_sample"))
    assert sorted(p.name for p in sample.iterdir()) == before  # it writes nothing there
    assert dataset.classes == datasets.KMNIST_CLASSES and dataset.metric == "acc"
    assert (dataset.num_classes, dataset.image_size) == (10, 28)
    assert "not the official benchmark protocol" in dataset.note and "80/20" in dataset.note
    assert class_counts(dataset.test, 10) == [200] * 10
    assert class_counts(dataset.valid, 10) == [80] * 10
    assert class_counts(dataset.train, 10) == [720] * 10
    for split in (dataset.train, dataset.valid, dataset.test):
        assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
        assert split.images.shape[1:] == (28, 28)

    # The three parts hold exactly the 10k official images (compared as sorted rows).
    original = formats.read_idx(sample / "t10k-images-idx3-ubyte.gz").reshape(10000, -1)
    parts = torch.cat([dataset.train.images, dataset.valid.images, dataset.test.images])
    rows = parts.reshape(10000, -1).numpy()
    assert np.array_equal(np.unique(rows, axis=0), np.unique(original, axis=0))
    assert len(np.unique(rows, axis=0)) == len(np.unique(original, axis=0))

    again = load_dataset(data_cfg("kmnist_sample"))
    assert torch.equal(again.test.images, dataset.test.images)
    assert torch.equal(again.valid.images, dataset.valid.images)
    other_seed = load_dataset(data_cfg("kmnist_sample", seed=1))
    assert torch.equal(other_seed.test.images, dataset.test.images)  # test fixed by split_seed
    assert not torch.equal(other_seed.valid.images, dataset.valid.images)
    other_split = load_dataset(data_cfg("kmnist_sample", split_seed=1))
    assert not torch.equal(other_split.test.images, dataset.test.images)

    # torchvision's layout under root is found as well.
    raw = tmp_path / "tv" / "KMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (raw / name).symlink_to(sample / name)
    via_torchvision = load_dataset(data_cfg("kmnist_sample", root=str(tmp_path / "tv")))
    assert torch.equal(via_torchvision.test.images, dataset.test.images)


# ---------------------------------------------------------------------------------------------
# Synthetic files in each real format


def test_kmnist_idx_files_load_into_a_stratified_partition(tmp_path: Path) -> None:
    written = synth.write_kmnist_idx(tmp_path / "KMNIST" / "raw", n_train=200, n_test=50)
    cfg = data_cfg("kmnist", root=str(tmp_path), download=False, verify=False)
    dataset = load_dataset(cfg)
    assert dataset.name == "kmnist" and dataset.classes == datasets.KMNIST_CLASSES
    assert class_counts(dataset.valid, 10) == [2] * 10
    assert class_counts(dataset.train, 10) == [18] * 10
    assert ids(dataset.test) == list(range(200, 250))  # the official test part, in file order
    assert torch.equal(dataset.test.images, torch.from_numpy(written["test_x"]))
    assert dataset.train.images.dtype == torch.uint8 and dataset.train.labels.dtype == torch.int64
    assert_partition(dataset, set(range(250)))
    # Each image keeps its own label.
    train_ids = torch.tensor(ids(dataset.train))
    assert torch.equal(
        dataset.train.labels, torch.from_numpy(written["train_y"])[train_ids].long()
    )


@pytest.mark.parametrize(("name", "num_classes"), [("kmnist", 10), ("k49", 49)])
def test_npz_releases_load(tmp_path: Path, name: str, num_classes: int) -> None:
    synth.write_release_npz(
        tmp_path, name, n_train=4 * num_classes, n_test=num_classes, num_classes=num_classes
    )
    cfg = data_cfg(name, root=str(tmp_path), download=False, verify=False)
    if name == "kmnist":
        cfg.format = "npz"
    dataset = load_dataset(cfg)
    assert dataset.num_classes == num_classes and dataset.image_size == 28
    assert class_counts(dataset.valid, num_classes) == [1] * num_classes
    assert dataset.metric == ("bacc" if name == "k49" else "acc")
    assert_partition(dataset, set(range(5 * num_classes)))


def test_stratified_split_rule() -> None:
    sizes = [1, 2, 3, 10, 100]
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(5), sizes))
    kept, taken = splits.stratified_split(labels, 0.1, seed=3)
    assert np.bincount(labels[taken], minlength=5).tolist() == [0, 1, 1, 1, 10]
    assert np.intersect1d(kept, taken).size == 0
    assert np.array_equal(np.sort(np.concatenate([kept, taken])), np.arange(len(labels)))
    again = splits.stratified_split(labels, 0.1, seed=3)
    assert np.array_equal(again[1], taken)
    assert not np.array_equal(splits.stratified_split(labels, 0.1, seed=4)[1], taken)
    assert splits.stratified_split(labels, 0.0, seed=3)[1].size == 0


@pytest.mark.parametrize("n", [0, 1, 7, 3 * splits.COMPACT_ROWS + 5])
def test_split_in_place_matches_fancy_indexing_without_a_second_copy(n: int) -> None:
    images = synth.labelled_images(0, n, 4)
    labels = np.arange(n) % 3
    expected = images.copy()
    first, second, third = np.array_split(np.random.default_rng(n).permutation(n), 3)
    parts = [np.sort(first), np.sort(second), np.sort(third)]
    result = splits.split_in_place(images, labels, parts)
    for split, index in zip(result, parts, strict=True):
        assert split.images.dtype == torch.uint8
        assert np.array_equal(split.images.numpy(), expected[index])
        assert np.array_equal(split.labels.numpy(), labels[index])
    # The first part lives in the handed-over array's memory; the others are copies.
    assert np.shares_memory(result[0].images.numpy(), images) or n == 0
    assert not any(np.shares_memory(s.images.numpy(), images) for s in result[1:])


def test_split_in_place_copies_a_read_only_array_once() -> None:
    images = synth.labelled_images(0, 10, 4)
    images.flags.writeable = False
    before = images.copy()
    train, valid = splits.split_in_place(images, np.zeros(10), [np.arange(2, 10), np.arange(2)])
    assert np.array_equal(images, before)  # left alone
    assert synth.image_ids(train.images) == list(range(2, 10))
    assert synth.image_ids(valid.images) == [0, 1]


def test_split_in_place_refuses_an_unsorted_first_part() -> None:
    images = synth.labelled_images(0, 4, 4)
    with pytest.raises(ValueError, match="ascending"):
        splits.split_in_place(images, np.zeros(4), [np.array([2, 1]), np.array([0, 3])])


KANJI = {0x4E00: 1, 0x4E8C: 2, 0x4E09: 3, 0x5B57: 12, 0x6F22: 30}  # code point -> images


def test_kkanji_tar_splits_caches_and_writes_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    synth.write_kkanji_tar(tmp_path / "kkanji.tar", KANJI)
    cfg = data_cfg("kkanji", root=str(tmp_path), download=False)
    with caplog.at_level(logging.INFO, logger="kmnist_sweep.data.datasets"):
        dataset = load_dataset(cfg)
    assert dataset.classes == [chr(cp) for cp in sorted(KANJI)]
    assert dataset.image_size == 64 and dataset.metric == "bacc" and dataset.note
    parts = (dataset.train, dataset.valid, dataset.test)
    table = np.array([class_counts(split, len(KANJI)) for split in parts]).T.tolist()
    by_class = {char: tuple(row) for char, row in zip(dataset.classes, table, strict=True)}
    assert by_class["一"] == (1, 0, 0)  # a single image stays in train
    assert by_class["二"] == (1, 0, 1)
    assert by_class["三"] == (1, 1, 1)
    assert by_class["字"] == (10, 1, 1)  # 12: test round(1.2) = 1, valid round(1.1) = 1
    assert by_class["漢"] == (24, 3, 3)  # 30: test round(3.0) = 3, valid round(2.7) = 3
    assert_partition(dataset, set(range(sum(KANJI.values()))))

    counts = tmp_path / "kkanji_split_seed0.csv"
    assert str(counts) in caplog.text
    rows = counts.read_text(encoding="utf-8").splitlines()
    assert rows[0] == "index,codepoint,char,train,valid,test"
    assert rows[1] == "0,U+4E00,一,1,0,0"

    # Same seeds: same split, now read from the decoded cache instead of the tar.
    assert (tmp_path / "kkanji_decoded.npz").is_file()
    monkeypatch.setattr(formats, "decode_kkanji_tar", lambda path: pytest.fail("decoded again"))
    again = load_dataset(cfg)
    for part in ("train", "valid", "test"):
        assert ids(getattr(again, part)) == ids(getattr(dataset, part))
    other = load_dataset(data_cfg("kkanji", root=str(tmp_path), download=False, split_seed=1))
    assert ids(other.test) != ids(dataset.test)


def test_synthetic_is_seeded_balanced_and_learnable() -> None:
    dataset = load_dataset(data_cfg("synthetic"))
    assert len(dataset.train) + len(dataset.valid) == 512 and len(dataset.test) == 128
    assert dataset.num_classes == 10 and dataset.image_size == 28
    test_counts = class_counts(dataset.test, 10)
    assert max(test_counts) - min(test_counts) <= 1  # balanced
    assert torch.equal(load_dataset(data_cfg("synthetic")).train.images, dataset.train.images)
    assert not torch.equal(
        load_dataset(data_cfg("synthetic", seed=1)).train.images, dataset.train.images
    )

    # Learnable: even nearest class mean, fitted on train, is nearly always right on test.
    x, y = dataset.train.images.flatten(1).float(), dataset.train.labels
    centroids = torch.stack([x[y == c].mean(0) for c in range(10)])
    predicted = torch.cdist(dataset.test.images.flatten(1).float(), centroids).argmin(1)
    assert (predicted == dataset.test.labels).float().mean() > 0.9


# ---------------------------------------------------------------------------------------------
# Bad input: one clear line naming the file and the problem


def test_missing_files_without_download(tmp_path: Path) -> None:
    cfg = data_cfg("kmnist", root=str(tmp_path), download=False)
    names = [name for pair in synth.IDX_NAMES.values() for name in pair]
    message = one_line_error(lambda: load_dataset(cfg), *names, str(tmp_path / "KMNIST" / "raw"))
    assert "data.download is false" in message


def test_truncated_gz(tmp_path: Path) -> None:
    raw = tmp_path / "KMNIST" / "raw"
    synth.write_kmnist_idx(raw, n_train=100, n_test=20)
    path = raw / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    cfg = data_cfg("kmnist", root=str(tmp_path), download=False, verify=False)
    message = one_line_error(lambda: load_dataset(cfg), path.name)
    assert "truncated" in message


def test_idx_payload_shorter_than_its_header_says(tmp_path: Path) -> None:
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:  # claims 10x28x28, holds one image
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">3I", 10, 28, 28) + bytes(784))
    one_line_error(lambda: formats.read_idx(path), path.name, "truncated")


def sample_dir_with_synthetic_files(directory: Path) -> Path:
    """The kmnist_sample files in a folder, but synthetic: the wrong size for the real ones."""
    synth.write_idx_gz(directory / "t10k-images-idx3-ubyte.gz", synth.labelled_images(0, 100, 28))
    synth.write_idx_gz(directory / "t10k-labels-idx1-ubyte.gz", synth.balanced_labels(100, 10))
    return directory / "t10k-images-idx3-ubyte.gz"


def test_wrong_size_against_the_official_file(tmp_path: Path) -> None:
    path = sample_dir_with_synthetic_files(tmp_path)
    cfg = data_cfg("kmnist_sample", root=str(tmp_path))
    message = one_line_error(lambda: load_dataset(cfg), path.name, "3041136")
    assert "bytes" in message


def test_checksum_mismatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = sample_dir_with_synthetic_files(tmp_path)
    monkeypatch.setitem(download.BYTES, path.name, path.stat().st_size)  # pass the size check
    cfg = data_cfg("kmnist_sample", root=str(tmp_path))
    message = one_line_error(lambda: load_dataset(cfg), path.name, download.MD5[path.name])
    assert "md5" in message and not (tmp_path / download.STAMP_FILE).exists()


def test_same_synthetic_files_load_when_not_verified(tmp_path: Path) -> None:
    sample_dir_with_synthetic_files(tmp_path)
    dataset = load_dataset(data_cfg("kmnist_sample", root=str(tmp_path), verify=False))
    assert class_counts(dataset.test, 10) == [2] * 10
    assert "0.1k official KMNIST test images split 80/20" in dataset.note
    assert_partition(dataset, set(range(100)))


@pytest.mark.parametrize(
    ("images", "labels", "bad_file"),
    [
        (synth.labelled_images(0, 20, 32), synth.balanced_labels(20, 10), "imgs"),  # 32x32
        (synth.labelled_images(0, 20, 28).reshape(20, -1), synth.balanced_labels(20, 10), "imgs"),
        (synth.labelled_images(0, 20, 28), synth.balanced_labels(19, 10), "imgs"),  # 19 labels
        (synth.labelled_images(0, 20, 28), synth.balanced_labels(20, 10) + 40, "imgs"),  # >= 10
    ],
    ids=["32px", "flat", "label-count", "label-range"],
)
def test_wrong_arrays_in_npz(
    tmp_path: Path, images: np.ndarray, labels: np.ndarray, bad_file: str
) -> None:
    synth.write_release_npz(tmp_path, "kmnist", n_train=20, n_test=10, num_classes=10)
    synth.write_npz(tmp_path / "kmnist-train-imgs.npz", images)
    synth.write_npz(tmp_path / "kmnist-train-labels.npz", labels)
    cfg = data_cfg("kmnist", root=str(tmp_path), format="npz", download=False, verify=False)
    one_line_error(lambda: load_dataset(cfg), f"kmnist-train-{bad_file}.npz")


def test_official_count_checked_when_verifying(tmp_path: Path) -> None:
    synth.write_release_npz(tmp_path, "kmnist", n_train=20, n_test=10, num_classes=10)
    cfg = data_cfg("kmnist", root=str(tmp_path), format="npz", download=False)
    one_line_error(lambda: load_dataset(cfg), "kmnist-train-imgs.npz", "60000")


def test_npz_that_is_not_an_archive(tmp_path: Path) -> None:
    synth.write_release_npz(tmp_path, "k49", n_train=49, n_test=49, num_classes=49)
    (tmp_path / "k49-test-labels.npz").write_bytes(b"PK\x03\x04 cut short")
    cfg = data_cfg("k49", root=str(tmp_path), download=False, verify=False)
    one_line_error(lambda: load_dataset(cfg), "k49-test-labels.npz")


@pytest.mark.parametrize("kind", ["no-members", "zero-bytes", "other-files", "bad-png-size"])
def test_unusable_kkanji_tar(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "kkanji.tar"
    if kind == "zero-bytes":
        path.write_bytes(b"")
    elif kind == "bad-png-size":
        synth.write_kkanji_tar(path, {0x4E00: 2}, size=32)
    else:
        with tarfile.open(path, "w") as tar:
            if kind == "other-files":
                (tmp_path / "README").write_text("not an image")
                tar.add(tmp_path / "README", arcname="kkanji2/README")
    cfg = data_cfg("kkanji", root=str(tmp_path), download=False)
    one_line_error(lambda: load_dataset(cfg), "kkanji.tar")


def test_bad_config_values_are_one_line_errors(tmp_path: Path) -> None:
    """Values are the config check's (tests/config/test_config.py); a data config missing a key,
    as a hand-built one can, is still one line."""
    cfg = data_cfg("synthetic")
    del cfg["n_test"]
    one_line_error(lambda: load_dataset(cfg), "n_test")


# ---------------------------------------------------------------------------------------------
# Downloads, from a local HTTP server


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # keep pytest's output clean
        pass


class CutShortHandler(QuietHandler):
    """Announces the whole file, sends half of it, and hangs up: a dropped connection."""

    def do_GET(self) -> None:
        body = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.close_connection = True


@pytest.fixture
def serve(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., str]]:
    """serve(folder, handler) -> URL of that folder on a 127.0.0.1 server for this test."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    servers: list[ThreadingHTTPServer] = []

    def start(folder: Path, handler: type[QuietHandler] = QuietHandler) -> str:
        server = ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(handler, directory=str(folder))
        )
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*.part"))


def served_kmnist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Synthetic IDX files to serve, registered as the official ones (md5s, counts, no sizes)."""
    served = tmp_path / "served"
    synth.write_kmnist_idx(served, n_train=100, n_test=20)
    monkeypatch.setitem(datasets.OFFICIAL_COUNTS, "kmnist", {"train": 100, "test": 20})
    for path in served.iterdir():
        monkeypatch.setitem(download.MD5, path.name, md5_hex(path))
        monkeypatch.delitem(download.BYTES, path.name)
    return served


def test_download_checks_md5_and_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serve: Callable[..., str]
) -> None:
    url = serve(served_kmnist(tmp_path, monkeypatch))
    root = tmp_path / "data"
    dataset = load_dataset(data_cfg("kmnist", root=str(root), mirror=url))
    assert len(dataset.train) + len(dataset.valid) == 100 and len(dataset.test) == 20
    raw = root / "KMNIST" / "raw"
    for name, md5 in json.loads((raw / download.STAMP_FILE).read_text()).items():
        assert md5[2] == md5_hex(raw / name) == md5_hex(tmp_path / "served" / name)
    assert leftovers(root) == []


def test_download_with_wrong_md5_saves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serve: Callable[..., str]
) -> None:
    url = serve(served_kmnist(tmp_path, monkeypatch))
    monkeypatch.setitem(download.MD5, "t10k-images-idx3-ubyte.gz", "0" * 32)
    root = tmp_path / "data"
    cfg = data_cfg("kmnist", root=str(root), mirror=url)
    one_line_error(lambda: load_dataset(cfg), "t10k-images-idx3-ubyte.gz", "0" * 32)
    assert not (root / "KMNIST" / "raw" / "t10k-images-idx3-ubyte.gz").exists()
    assert leftovers(root) == []


def test_cut_short_download_saves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serve: Callable[..., str]
) -> None:
    url = serve(served_kmnist(tmp_path, monkeypatch), CutShortHandler)
    root = tmp_path / "data"
    cfg = data_cfg("kmnist", root=str(root), mirror=url, verify=False)
    message = one_line_error(lambda: load_dataset(cfg), "train-images-idx3-ubyte.gz", url)
    assert "ended after" in message
    assert list((root / "KMNIST" / "raw").iterdir()) == []


def test_unreachable_mirror_is_one_error_listing_every_file(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/kmnist/"
    root = tmp_path / "data"
    names = [name for pair in synth.IDX_NAMES.values() for name in pair]
    urls = [url + name for name in names]
    message = one_line_error(
        lambda: load_dataset(data_cfg("kmnist", root=str(root), mirror=url)),
        *names,
        *urls,
        str(root / "KMNIST" / "raw"),
    )
    assert "download failed" in message
    assert leftovers(root) == []


def test_file_url_mirror_and_kkanji_download(tmp_path: Path, serve: Callable[..., str]) -> None:
    served = tmp_path / "served"
    synth.write_release_npz(served, "k49", n_train=98, n_test=49, num_classes=49)
    cfg = data_cfg("k49", root=str(tmp_path / "k49"), mirror=served.as_uri(), verify=False)
    assert len(load_dataset(cfg).test) == 49

    synth.write_kkanji_tar(served / "kkanji.tar", KANJI)
    cfg = data_cfg("kkanji", root=str(tmp_path / "kkanji"), mirror=serve(served))
    assert load_dataset(cfg).num_classes == len(KANJI)
    assert (tmp_path / "kkanji" / "kkanji.tar").read_bytes() == (
        served / "kkanji.tar"
    ).read_bytes()
