"""Operations from docs/operations.md: moving a study from SQLite to PostgreSQL and resuming
it there, as one would when a sweep outgrows one machine."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.reliability.harness import (
    PG_URL,
    assert_consistent,
    drop_study,
    finished,
    last_line,
    load,
    run,
    toy_args,
)

pytestmark = [pytest.mark.reliability, pytest.mark.postgres]


@pytest.mark.skipif(not PG_URL, reason="KMNIST_SWEEP_PG_URL is not set")
def test_a_sqlite_study_moves_to_postgresql_and_resumes_there(tmp_path: Path) -> None:
    assert PG_URL is not None
    name = f"move-{uuid.uuid4().hex[:10]}"
    sqlite = f"sqlite:///{tmp_path / 'storage' / name}.db"
    try:
        first = run(toy_args("study.n_trials=6", f"study.name={name}"), tmp_path)
        assert first.proc.returncode == 0, first.stderr
        before = load(sqlite, name)

        move = run(["copy-study", sqlite, PG_URL, name], tmp_path)
        assert move.proc.returncode == 0, move.stderr
        assert f"copied study '{name}': {len(before.trials)} trials to " in move.stdout
        moved = load(PG_URL, name)
        assert [(t.number, t.state, t.params, t.value) for t in moved.trials] == [
            (t.number, t.state, t.params, t.value) for t in before.trials
        ]
        assert moved.user_attrs == before.user_attrs  # metric, search space

        again = run(["copy-study", sqlite, PG_URL, name], tmp_path)
        assert again.proc.returncode == 2
        clash = f"kmnist_sweep: error: study '{name}' already exists in {PG_URL}"
        assert last_line(again) == clash

        # The same sweep, pointed at PostgreSQL with a larger total, adds only the rest.
        args = toy_args("study.n_trials=10", f"study.name={name}", f"study.storage='{PG_URL}'")
        resumed = run(args, tmp_path)
        assert resumed.proc.returncode == 0, resumed.stderr
        assert_consistent(load(PG_URL, name), 10)
        assert finished(load(sqlite, name)) == 6  # the source is left as it was
    finally:
        drop_study(PG_URL, name)
