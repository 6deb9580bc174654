"""Hosts made with network namespaces on this machine, for tests of one study shared by
several machines: a "database host" running its own PostgreSQL instance and "worker hosts"
running launchers, each with its own address on a private bridge inside the database host.
Nothing is routed out of the namespaces: no traffic leaves the machine.

    with Hosts(tmp_path, workers=3) as hosts:
        url = hosts.storage_url                   # postgresql://postgres@10.77.0.1:5432/postgres
        seen = hosts.observer_url                 # the same server, for the test's own reads
        sweep = hosts.launch("w1", args, cwd)     # `ip netns exec <w1> python -m kmnist_sweep`
        hosts.link_down("w1"); hosts.link_up("w1")
        hosts.kill_all("w2")                      # every process of that host
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType

from tests.reliability.harness import Sweep

SUBNET = "10.77.0"
DB_ADDRESS = f"{SUBNET}.1"


def missing() -> str | None:
    """Why these tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("runuser") is None:
        return "no `ip` (iproute2) or `runuser` here"
    if not _pg_bin():
        return "no PostgreSQL server binaries (/usr/lib/postgresql/*/bin/initdb)"
    probe = f"ksprobe{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class Hosts:
    """A database host and `workers` worker hosts (w1, w2, ...); all removed on exit."""

    def __init__(self, workers: int) -> None:
        tag = uuid.uuid4().hex[:6]
        self.db = f"ks{tag}-db"
        self.names = {f"w{i}": f"ks{tag}-w{i}" for i in range(1, workers + 1)}
        self.pg_dir = Path(tempfile.mkdtemp(prefix="ks-pg-"))  # postgres must reach it
        self.storage_url = f"postgresql://postgres@{DB_ADDRESS}:5432/postgres"
        # The test itself, outside every namespace, reads the study over the server's unix
        # socket: a file, which the namespaces do not separate.
        self.observer_url = f"postgresql://postgres@/postgres?host={self.pg_dir}"

    def __enter__(self) -> Hosts:
        try:
            self._make_network()
            self._start_postgres()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _make_network(self) -> None:
        ip("netns", "add", self.db)
        ip("-n", self.db, "link", "set", "lo", "up")
        ip("-n", self.db, "link", "add", "br0", "type", "bridge")
        ip("-n", self.db, "link", "add", "db0", "type", "veth", "peer", "name", "db0p")
        ip("-n", self.db, "link", "set", "db0p", "master", "br0")
        ip("-n", self.db, "addr", "add", f"{DB_ADDRESS}/24", "dev", "db0")
        for dev in ("br0", "db0", "db0p"):
            ip("-n", self.db, "link", "set", dev, "up")
        for i, (short, ns) in enumerate(self.names.items(), start=11):
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
            # eth0 in the worker host, its peer (the host's "cable") on the bridge.
            ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", short)
            ip("-n", ns, "link", "set", short, "netns", self.db)
            ip("-n", ns, "addr", "add", f"{SUBNET}.{i}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", self.db, "link", "set", short, "master", "br0")
            ip("-n", self.db, "link", "set", short, "up")

    def _start_postgres(self) -> None:
        """A PostgreSQL instance of its own on the database host's address."""
        pg_bin = _pg_bin()
        assert pg_bin is not None
        data = self.pg_dir / "data"
        shutil.chown(self.pg_dir, "postgres", "postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
        subprocess.run(
            [
                *as_postgres,
                str(pg_bin / "initdb"),
                "-D",
                str(data),
                "--auth=trust",
                "-U",
                "postgres",
            ],
            check=True,
            capture_output=True,
        )
        with open(data / "pg_hba.conf", "a") as hba:
            hba.write(f"host all all {SUBNET}.0/24 trust\n")
        options = f"-c listen_addresses={DB_ADDRESS} -c port=5432 -k {self.pg_dir}"
        options += " -c max_connections=200 -c fsync=off"
        subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                self.db,
                *as_postgres,
                str(pg_bin / "pg_ctl"),
                "-D",
                str(data),
                "-o",
                options,
                "-l",
                str(self.pg_dir / "server.log"),
                "-w",
                "start",
            ],
            check=True,
            capture_output=True,
        )

    def launch(self, host: str, args: list[str], cwd: Path) -> Sweep:
        """`python -m kmnist_sweep ARGS` on worker host `host`, in `cwd` (its own disk)."""
        cwd.mkdir(parents=True, exist_ok=True)
        return Sweep(args, cwd, prefix=["ip", "netns", "exec", self.names[host]])

    def link_down(self, host: str) -> None:
        """The host's cable pulled: packets to and from it vanish, nothing is refused."""
        ip("-n", self.db, "link", "set", host, "down")

    def link_up(self, host: str) -> None:
        ip("-n", self.db, "link", "set", host, "up")

    def pids(self, host: str) -> list[int]:
        ns = self.names.get(host, host)
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def kill_all(self, host: str) -> int:
        """Every process of the host killed at once, as a power cut would; how many."""
        pids = self.pids(host)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return len(pids)

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        pg_bin = _pg_bin()
        if pg_bin is not None and (self.pg_dir / "data" / "postmaster.pid").exists():
            subprocess.run(
                [
                    "runuser",
                    "-u",
                    "postgres",
                    "--",
                    str(pg_bin / "pg_ctl"),
                    "-D",
                    str(self.pg_dir / "data"),
                    "-m",
                    "immediate",
                    "stop",
                ],
                capture_output=True,
            )
        for ns in [*self.names.values(), self.db]:
            self.kill_all(ns)
        time.sleep(0.5)
        for ns in [*self.names.values(), self.db]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(self.pg_dir, ignore_errors=True)
