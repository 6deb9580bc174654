"""Every case of docs/bad-input.md, run as a user runs it: `python -m kmnist_sweep <args>`.

The table in the docs is this test's input, so the two cannot drift apart. Each case runs
in one temporary folder that holds an existing study (made first, by a real sweep with the
toy objective) and a few broken files. A case must exit with status 2, print exactly its
documented line on stderr and no traceback anywhere, and leave every file and folder there
as it was: the study's SQLite database is compared as a full SQL dump, other files by size
and mtime, and no file or folder may appear (Hydra's own run folders aside).

A CLI start costs seconds of imports (torch, fastai), so the cases run
KMNIST_SWEEP_TEST_JOBS at a time (default 2). No case may change anything, so each one
compares the folder after it with the folder before all of them; with
KMNIST_SWEEP_TEST_JOBS=1 a change is pinned on exactly the case that made it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
import struct
import subprocess
import zipfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

from kmnist_sweep.config.search_space import space_difference
from kmnist_sweep.data.datasets import K49_CLASSES
from kmnist_sweep.data.download import BYTES
from kmnist_sweep.results.bundle import BUNDLE_JSON, make_bundle, write_bundle
from kmnist_sweep.train.model import build_model
from tests.conftest import run_cli
from tests.synth_files import IDX_NAMES, balanced_labels, labelled_images, write_idx_gz

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "bad-input.md"
TOY = "tests.toy_objective:make_toy_objective"
# The study the clash cases (and every `+sweep=lr data=synthetic` case) point at.
EXISTING_STUDY = (
    "+sweep=lr",
    "data=synthetic",
    f"debug.objective={TOY}",
    "study.n_trials=2",
    "study.sampler.type=random",
)
JOBS = max(1, int(os.environ.get("KMNIST_SWEEP_TEST_JOBS", "2")))


@dataclass(frozen=True)
class Case:
    id: str
    what: str  # the category of bad input
    args: tuple[str, ...]  # after `python -m kmnist_sweep`
    line: str  # stderr, exactly; <tmp> stands for the temporary folder


def read_cases(text: str) -> list[Case]:
    """The rows of the table in docs/bad-input.md: | id | what | `args` | `line` |."""
    cases = []
    for row in text.splitlines():
        if not row.startswith("| ") or row.startswith("| id |"):
            continue
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        assert len(cells) == 4, f"a row of four cells, no '|' inside them: {row}"
        case_id, what, args, line = cells
        cases.append(Case(case_id, what, tuple(_code(args).split()), _code(line)))
    return cases


def _code(cell: str) -> str:
    assert len(cell) > 2 and cell[0] == cell[-1] == "`", f"expected `code`, got {cell}"
    return cell[1:-1]


CASES = read_cases(DOC.read_text(encoding="utf-8"))


def skip_reason(case: Case) -> str | None:
    """The PostgreSQL case's line is psycopg2's and libpq's wording."""
    if any("postgresql://" in arg for arg in case.args) and (
        importlib.util.find_spec("psycopg2") is None or importlib.util.find_spec("psycopg")
    ):
        return "the documented line is psycopg2's; psycopg2 is not the PostgreSQL driver here"
    return None


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, cwd=cwd, timeout=600)


# --------------------------------------------------------------------------- the folder


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The temporary folder of docs/bad-input.md: an existing study and broken files."""
    root = tmp_path_factory.mktemp("bad-input").resolve()
    (root / "afile").write_text("a regular file, not a folder\n")
    (root / "notadb.db").write_text("this is not a database\n")
    (root / "empty").mkdir()
    images, labels = IDX_NAMES["test"]
    for folder in ("trunc", "badmd5"):
        write_idx_gz(root / folder / images, labelled_images(0, 100, 28))
        write_idx_gz(root / folder / labels, balanced_labels(100, 10))
    cut = root / "trunc" / images
    cut.write_bytes(cut.read_bytes()[:4096])  # a download cut short
    (root / "badmd5" / images).write_bytes(bytes(BYTES[images]))  # official size, other bytes
    write_bundles(root)
    made = cli(*EXISTING_STUDY, cwd=root)
    assert made.returncode == 0, made.stderr[-3000:]
    assert (root / "storage" / "lr-synthetic.db").is_file()
    return root


def write_bundles(root: Path) -> None:
    """digit.png, strip.png; model.zip, a real bundle of an untrained ResNet-18 for 10
    classes; two edited copies: model-v9.zip (format version 9) and model-mixed.zip (K49's
    class map); and model-deflate.zip, model.zip with bundle.json's compressed bytes
    overwritten."""
    Image.fromarray(labelled_images(0, 1, 28)[0]).save(root / "digit.png")
    Image.new("L", (60000, 2000), 255).save(root / "strip.png")  # over predict's pixel limit
    cfg = OmegaConf.create(
        {"model": {"arch": "resnet18", "stem": "imagenet", "pretrained": False}}
    )
    write_bundle(
        root / "model.zip",
        make_bundle(
            cfg,
            classes=list("0123456789"),
            image_size=28,
            mean=0.2,
            std=0.3,
            views=1,
            model=build_model(cfg.model, 10),
            data_name="synthetic",
            note="",
            files=(),
            source={},
        ),
    )
    edits = {
        "model-v9.zip": {"format_version": 9, "versions": {"kmnist_sweep": "9.0.0"}},
        "model-mixed.zip": {"classes": K49_CLASSES, "data": {"name": "k49", "files": {}}},
    }
    with zipfile.ZipFile(root / "model.zip") as source:
        entries = {name: source.read(name) for name in source.namelist()}
    for name, edit in edits.items():
        meta = {**json.loads(entries[BUNDLE_JSON]), **edit}
        with zipfile.ZipFile(root / name, "w") as out:
            for entry, data in entries.items():
                out.writestr(entry, json.dumps(meta) if entry == BUNDLE_JSON else data)
    whole = bytearray((root / "model.zip").read_bytes())
    with zipfile.ZipFile(root / "model.zip") as source:
        at = source.getinfo(BUNDLE_JSON).header_offset
    name_len, extra_len = struct.unpack("<HH", whole[at + 26 : at + 30])  # local file header
    start = at + 30 + name_len + extra_len
    whole[start : start + 16] = b"\xff" * 16  # not a deflate stream: zlib refuses it
    (root / "model-deflate.zip").write_bytes(bytes(whole))


def snapshot(root: Path) -> dict[str, object]:
    """Every folder and file under `root` but Hydra's run folders and SQLite's transient
    -wal/-shm files: a database under storage/ as its SQL dump, others as (size, mtime)."""
    state: dict[str, object] = {}
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        rel = here.relative_to(root).as_posix()
        if rel == "sweeps":
            dirs[:] = [d for d in dirs if d != "_runs"]
        # check_writable_dir's probe folder lives for microseconds while a case runs
        dirs[:] = [d for d in dirs if not d.startswith(".write-test-")]
        for name in dirs:
            state[(here / name).relative_to(root).as_posix()] = "folder"
        for name in files:
            path = here / name
            key = path.relative_to(root).as_posix()
            if name.endswith(("-wal", "-shm", "-journal")):
                continue
            if key.startswith("storage/") and name.endswith(".db"):
                state[key] = dump(path)
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            state[key] = (stat.st_size, stat.st_mtime_ns)
    return state


def dump(db: Path) -> str:
    con = sqlite3.connect(db)
    try:
        return "\n".join(con.iterdump())
    finally:
        con.close()


@dataclass(frozen=True)
class Outcome:
    proc: subprocess.CompletedProcess[str]
    after: dict[str, object]  # snapshot() once the case exited


def run_case(case: Case, root: Path) -> Outcome:
    proc = cli(*case.args, cwd=root)
    return Outcome(proc, snapshot(root))


@pytest.fixture(scope="module")
def outcomes(
    request: pytest.FixtureRequest, workdir: Path
) -> Iterator[tuple[dict[str, object], dict[str, Future[Outcome]]]]:
    """(the folder before any case, case id -> its outcome): every selected case starts
    here, JOBS at a time, and each test waits for its own."""
    this = Path(__file__).resolve()
    selected = []
    for item in request.session.items:
        case = getattr(getattr(item, "callspec", None), "params", {}).get("case")
        mine = isinstance(case, Case) and Path(str(item.path)).resolve() == this
        if mine and skip_reason(case) is None:
            selected.append(case)
    baseline = snapshot(workdir)
    pool = ThreadPoolExecutor(max_workers=JOBS)
    try:
        yield baseline, {case.id: pool.submit(run_case, case, workdir) for case in selected}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- the tests


def test_the_docs_list_at_least_24_distinct_cases() -> None:
    assert len(CASES) >= 24
    assert len({case.id for case in CASES}) == len(CASES), "case ids repeat"
    assert len({case.args for case in CASES}) == len(CASES), "arguments repeat"
    for case in CASES:
        assert case.line.startswith("kmnist_sweep: error: "), case.id


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(
    case: Case,
    workdir: Path,
    outcomes: tuple[dict[str, object], dict[str, Future[Outcome]]],
) -> None:
    reason = skip_reason(case)
    if reason is not None:
        pytest.skip(reason)
    baseline, futures = outcomes
    outcome = futures[case.id].result()
    out = outcome.proc
    shown = f"exit {out.returncode}\nstdout: {out.stdout[-2000:]}\nstderr: {out.stderr[-3000:]}"
    assert "Traceback" not in out.stdout + out.stderr, shown
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines == [case.line.replace("<tmp>", str(workdir))], shown
    assert out.returncode == 2, shown
    changed = sorted(
        key
        for key in baseline.keys() | outcome.after.keys()
        if baseline.get(key) != outcome.after.get(key)
    )
    assert changed == [], f"{case.id} changed, created or removed {changed}"


def test_a_search_space_written_differently_is_the_same_study() -> None:
    """A clash is about what is searched, not how it is written: re-runs must resume."""
    dotted = {
        "trainer.lr": {"type": "float", "low": 1e-4, "high": 0.1, "log": True},
        "trainer.batch_size": {"type": "pow2", "low": 32, "high": 2048},
        "model.arch": {"type": "categorical", "choices": ["resnet18", "resnet34"]},
    }
    nested = {
        "model": {"arch": {"choices": ["resnet18", "resnet34"], "type": "categorical"}},
        "trainer": {
            "batch_size": {"type": "pow2", "low": 32.0, "high": 2048},
            "lr": {"type": "float", "low": 0.0001, "high": 0.1, "log": True, "step": None},
        },
    }
    assert space_difference(dotted, nested) is None
    narrowed = {**dotted, "trainer.lr": {**dotted["trainer.lr"], "high": 0.01}}
    assert space_difference(dotted, narrowed) == (
        "trainer.lr: float 0.0001..0.1 log there, float 0.0001..0.01 log here"
    )
    fewer = {k: v for k, v in dotted.items() if k != "model.arch"}
    assert space_difference(dotted, fewer) == (
        "model.arch: categorical ['resnet18', 'resnet34'] there, not searched here"
    )
    reordered = {
        **dotted,
        "model.arch": {"type": "categorical", "choices": ["resnet34", "resnet18"]},
    }
    assert space_difference(dotted, reordered) is not None  # Optuna's choices are ordered
