"""Scale check, run by hand: `python benchmarks/scale.py [--trials 1000] [--launchers 3]
[--workers 8] [--kills 6] [--outage 30]` (needs KMNIST_SWEEP_PG_URL, e.g.
postgresql://postgres@127.0.0.1:5432/test).

Several launchers (`python -m kmnist_sweep`, `study.workers` worker processes each) start at
the same instant on one new PostgreSQL database, as a job array starts them, and share one
study of the fast toy objective (tests/toy_objective.py). They reach the database through a
TCP proxy that this script cuts for `--outage` seconds mid-sweep; meanwhile `--kills` busy
workers are SIGKILLed one by one (their launchers replace them). At the end the study must
hold exactly `--trials` finished trials, none RUNNING, every FAIL explained or retried. Prints
the row of docs/operations.md's scale table.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import sqlalchemy

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.reliability.harness import (  # noqa: E402
    PG_URL,
    Proxy,
    Sweep,
    assert_consistent,
    finished,
    load,
    states,
    toy_args,
)
from tests.reliability.test_scaleout import fresh_pg_database  # noqa: E402

NAME = "scale"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--launchers", type=int, default=3)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--outage", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=Path("/tmp/kmnist-scale"))
    args = parser.parse_args()
    if not PG_URL:
        sys.exit("set KMNIST_SWEEP_PG_URL (postgresql://user@host:port/db)")
    shutil.rmtree(args.out, ignore_errors=True)
    with fresh_pg_database() as url:
        run(url, args)


def run(url: str, args: argparse.Namespace) -> None:
    target = sqlalchemy.make_url(url)
    proxy = Proxy((target.host or "127.0.0.1", target.port or 5432))
    through = target.set(host="127.0.0.1", port=proxy.port).render_as_string(False)
    start = time.time()
    sweep_args = toy_args(
        f"study.n_trials={args.trials}",
        f"study.workers={args.workers}",
        f"study.storage='{through}'",
        f"study.name={NAME}",
        f"launcher.max_worker_restarts={args.kills}",
        "study.report=false",
        f"+toy.start_at={start + 15}",
        epochs=2,
        sleep=0.02,
    )
    launchers = []
    for i in range(args.launchers):
        cwd = args.out / f"launcher-{i}"  # each its own output folder, as on its own machine
        cwd.mkdir(parents=True, exist_ok=True)
        launchers.append(Sweep(sweep_args, cwd))
    kills = kill_workers(launchers, url, args)
    done_at_cut = cut(proxy, url, args)
    codes = [s.wait(3600) for s in launchers]
    wall = time.time() - start
    study = load(url, NAME)
    for s in launchers:
        tail = (s.output.strip().splitlines() or [""])[-1]
        print(f"launcher {s.out.parent.name}: exit {s.proc.returncode}: {tail}")
    assert codes == [0] * len(codes), codes
    assert_consistent(study, args.trials)  # total exact, nothing RUNNING, every FAIL explained
    replaced = sum(s.output.count("replaced by a new one") for s in launchers)
    counts = dict(states(study))
    print(
        f"| {args.trials} | {args.launchers} x {args.workers} | {kills} SIGKILLs "
        f"({replaced} replaced), database cut {args.outage:.0f} s at {done_at_cut} finished "
        f"| {counts} | 0 | {wall / 60:.1f} min |"
    )


def kill_workers(launchers: list[Sweep], url: str, args: argparse.Namespace) -> int:
    """SIGKILL `args.kills` workers, round-robin over the launchers, spread over the first
    third of the trials."""
    killed = 0
    while killed < args.kills:
        target = args.trials * (killed + 1) // (3 * args.kills)
        while done(url) < target:
            time.sleep(1)
        children = launchers[killed % len(launchers)].children()
        if children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(children[0], signal.SIGKILL)
            killed += 1
            print(f"killed worker pid {children[0]} at {done(url)} finished", flush=True)
    return killed


def cut(proxy: Proxy, url: str, args: argparse.Namespace) -> int:
    """The database connection cut for `args.outage` s once half the trials are done."""
    while done(url) < args.trials // 2:
        time.sleep(1)
    at = done(url)
    proxy.cut()
    print(f"database connection cut at {at} finished", flush=True)
    time.sleep(args.outage)
    proxy.restore()
    print(f"restored after {args.outage:.0f} s: {done(url)} finished", flush=True)
    return at


def done(url: str) -> int:
    try:
        return finished(load(url, NAME))
    except Exception:  # not created yet
        return 0


if __name__ == "__main__":
    main()
