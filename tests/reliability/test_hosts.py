"""One study, several machines: launchers on three worker hosts share a PostgreSQL study on a
database host, the hosts made with network namespaces (tests/reliability/hosts.py). One worker
host's link goes down for 30 s mid-sweep, another host is killed outright (every process in
it); the total is exact, nothing is left RUNNING, every failed trial is explained and retried.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from tests.reliability import hosts as hosts_lib
from tests.reliability.harness import (
    assert_consistent,
    finished,
    finished_at_least,
    load,
    no_traceback,
    record,
    states,
    toy_args,
    wait_until,
)

MISSING = hosts_lib.missing()
pytestmark = [
    pytest.mark.hosts,
    pytest.mark.reliability,
    pytest.mark.slow,
    pytest.mark.skipif(MISSING is not None, reason=str(MISSING)),
]

OUTAGE_S = 30


def test_three_hosts_share_a_study_through_a_link_outage_and_a_dead_host(
    tmp_path: Path,
) -> None:
    n, workers, name = 60, 2, "hosts"
    with hosts_lib.Hosts(workers=3) as hosts:
        url, seen = hosts.storage_url, hosts.observer_url
        args = toy_args(
            f"study.n_trials={n}",
            f"study.workers={workers}",
            f"study.storage='{url}'",
            f"study.name={name}",
            epochs=3,
            sleep=0.4,
        )
        start = time.time()
        first = hosts.launch("w1", args, tmp_path / "w1")  # creates the study
        wait_until(finished_at_least(seen, name, 1), 180, "a first trial", first)
        sweeps = {"w1": first}
        sweeps |= {h: hosts.launch(h, args, tmp_path / h) for h in ("w2", "w3")}
        wait_until(lambda: running_on(seen, name, "w3", hosts), 180, "w3 running a trial", first)

        killed = hosts.kill_all("w3")  # a host lost outright: launcher and workers
        sweeps["w3"].wait(30)
        hosts.link_down("w1")
        down_at = finished(load(seen, name))
        time.sleep(OUTAGE_S)
        during = finished(load(seen, name)) - down_at
        hosts.link_up("w1")

        for host in ("w1", "w2"):
            assert sweeps[host].wait(600) == 0, f"{host}:\n{sweeps[host].output}"
            no_traceback(sweeps[host])
            for log in sorted((tmp_path / host / "sweeps" / name / "logs").glob("*.log")):
                assert "done" in log.read_text().splitlines()[-1], f"{log}:\n{log.read_text()}"
        study = load(seen, name)
        assert_consistent(study, n)
        assert states(study)["FAIL"] >= 1  # the dead host's trial at least
        assert during > 0  # w2 went on while w1 was cut off
        record(
            "three_hosts",
            study,
            hosts=3,
            workers_per_host=workers,
            killed_processes=killed,
            outage_s=OUTAGE_S,
            wall_s=round(time.time() - start),
        )


def running_on(url: str, name: str, host: str, hosts: hosts_lib.Hosts) -> bool:
    """A trial of a worker process of `host` is running."""
    try:
        running = load(url, name).get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    except Exception:
        return False
    pids = {str(pid) for pid in hosts.pids(host)}
    return any(str(t.user_attrs.get("process", "")).rsplit(":", 1)[-1] in pids for t in running)
