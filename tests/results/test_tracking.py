"""Tracking: real offline wandb runs read back from disk, secrets kept out, failures contained."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

import kmnist_sweep  # noqa: F401  (torchvision compat first)
from kmnist_sweep.masking import scrub, scrub_text
from kmnist_sweep.results.tracking import Tracker, resolve_mode

DB_PASSWORD = "hunter2-db-Pa55"
API_KEY = "0123456789abcdef0123456789abcdef01234567"  # 40 hex chars, like a real key


def tracking_cfg(mode: str, directory: Path) -> Any:
    return OmegaConf.create(
        {
            "mode": mode,
            "project": "kmnist_sweep",
            "entity": None,
            "dir": str(directory),
            "init_timeout": 30,
        }
    )


# ---------------------------------------------------------------- reading .wandb files

BLOCK = 32 * 1024  # LevelDB log format, which wandb's transaction log uses
HEADER = 7  # ":W&B" + magic 0xBEE1 (little-endian) + version byte


def read_records(path: Path) -> list[Any]:
    """Every record of a `.wandb` transaction log, parsed with wandb's own protobuf."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1
    records, chunks, pos = [], b"", HEADER
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # trailer too small for a header: padding up to the next block
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        if kind == 0:  # zero padding
            pos += left
            continue
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def offline_runs(directory: Path) -> dict[str, list[Any]]:
    """display name -> records, for every offline run under `directory`/wandb."""
    runs = {}
    for path in sorted((directory / "wandb").glob("offline-run-*/run-*.wandb")):
        records = read_records(path)
        name = next(r.run.display_name for r in records if r.WhichOneof("record_type") == "run")
        runs[name] = records
    return runs


def item_key(item: Any) -> str:
    """wandb stores a key either in `key` or split into `nested_key`."""
    return str(item.key) or "/".join(item.nested_key)


def history(records: list[Any]) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({item_key(item): json.loads(item.value_json) for item in r.history.item})
    return rows


def run_config(records: list[Any]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for r in records:
        kind = r.WhichOneof("record_type")
        items = (
            r.run.config.update if kind == "run" else r.config.update if kind == "config" else []
        )
        config.update({item_key(item): json.loads(item.value_json) for item in items})
    return config


def summary(records: list[Any]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            values.update(
                {item_key(item): json.loads(item.value_json) for item in r.summary.update}
            )
    return values


# ---------------------------------------------------------------- tests


def test_offline_trials_are_readable_and_hold_no_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_API_KEY", API_KEY)
    storage = f"postgresql://sweeper:{DB_PASSWORD}@db.example:5432/studies"
    tracker = Tracker(tracking_cfg("offline", tmp_path), "lr-kmnist")
    assert tracker.mode == "offline"
    for number in range(2):
        config = {
            "trainer": {"lr": 0.01 * (number + 1), "batch_size": 256},
            "study": {"storage": storage, "db_password": DB_PASSWORD},
        }
        tracker.start_trial(number, config)
        for epoch in (1, 2, 3):
            tracker.log_epoch(epoch, {"val/acc": 0.5 + 0.1 * epoch, "train/loss": 1.0 / epoch})
        tracker.end_trial("complete" if number == 0 else "pruned", "median pruner", {"best": 0.8})
    assert not tracker.broken
    tracker.close()  # wandb-core writes a run's last records when its stream closes

    runs = offline_runs(tmp_path)
    assert set(runs) == {"trial-0", "trial-1"}
    for number, name in enumerate(("trial-0", "trial-1")):
        records = runs[name]
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        assert (run.run_group, run.job_type) == ("lr-kmnist", "trial")
        rows = [row for row in history(records) if "val/acc" in row]
        assert [row["epoch"] for row in rows] == [1, 2, 3]
        assert rows[-1]["val/acc"] == pytest.approx(0.8)
        config = run_config(records)
        assert config["trainer"]["lr"] == pytest.approx(0.01 * (number + 1))
        assert config["study"]["storage"] == "postgresql://sweeper:***@db.example:5432/studies"
        assert config["study"]["db_password"] == "***"
        final = summary(records)
        assert final["state"] == ("complete" if number == 0 else "pruned")
        assert final["reason"] == "median pruner"

    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files
    for path in files:
        data = path.read_bytes()
        assert DB_PASSWORD.encode() not in data, path
        assert API_KEY.encode() not in data, path


def test_a_wandb_error_is_one_warning_and_never_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    tracker = Tracker(tracking_cfg("offline", tmp_path), "study")
    tracker.start_trial(7, {"trainer": {"lr": 0.1}})
    assert tracker.run is not None

    def broken_log(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"upload to postgresql://u:{DB_PASSWORD}@h/db failed")

    monkeypatch.setattr(tracker.run, "log", broken_log)
    with caplog.at_level(logging.WARNING, logger="kmnist_sweep.results.tracking"):
        tracker.log_epoch(1, {"val/acc": 0.5})
        tracker.log_epoch(2, {"val/acc": 0.6})
        tracker.log_image("lr_finder", tmp_path / "missing.png")
        tracker.end_trial("complete")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "trial 7" in warnings[0].getMessage()
    assert DB_PASSWORD not in warnings[0].getMessage()
    assert tracker.run is None

    # The next trial tracks again.
    tracker.start_trial(8, {})
    assert tracker.run is not None and not tracker.broken
    tracker.end_trial("complete")
    tracker.close()


def test_disabled_tracker_writes_nothing(tmp_path: Path) -> None:
    tracker = Tracker(tracking_cfg("disabled", tmp_path / "out"), "study")
    tracker.start_trial(0, {"a": 1})
    tracker.log_epoch(1, {"val/acc": 0.5})
    tracker.end_trial("complete")
    tracker.log_study_summary({"best": 1.0}, {})
    assert not (tmp_path / "out").exists()


def test_online_without_key_falls_back_to_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert resolve_mode({"mode": "online"}) == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + API_KEY)
    assert resolve_mode({"mode": "online"}) == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")  # the environment may only lower the mode
    assert resolve_mode({"mode": "online"}) == "offline"
    assert resolve_mode({"mode": "disabled"}) == "disabled"
    monkeypatch.setenv("WANDB_MODE", "online")
    assert resolve_mode({"mode": "offline"}) == "offline"


def test_scrub_masks_secret_keys_and_url_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", API_KEY)
    config = OmegaConf.create(
        {
            "study": {"storage": "postgresql+psycopg2://me:s3cr3t@host/db", "name": "x"},
            "urls": ["redis://:pw@cache:6379/0", "https://h/x?token=abc&page=2"],
            "wandb_api_key": "k",
            "apikey": "k",
            "private_key": "k",
            "auth_token": "k",
            "monkey": "banana",
            "lr": 0.1,
        }
    )
    clean = scrub(config)
    assert clean["study"] == {"storage": "postgresql+psycopg2://me:***@host/db", "name": "x"}
    assert clean["urls"] == ["redis://:***@cache:6379/0", "https://h/x?token=***&page=2"]
    assert {clean[k] for k in ("wandb_api_key", "apikey", "private_key", "auth_token")} == {"***"}
    assert (clean["monkey"], clean["lr"]) == ("banana", 0.1)
    assert scrub_text(f"key is {API_KEY}") == "key is ***"
