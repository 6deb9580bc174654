"""optuna-dashboard, as the README tells users to run it, rendered by a real headless Chromium:
on a study made by hand in every trial state, and on one the runner wrote (a multi-objective
`+sweep=full` through the command line), whose metric names the dashboard must show.

Needs Debian's chromium and chromium-driver (`.ci/browser-deps` installs them). Without them
the test skips, except in CI (env CI set), where it fails so that CI proves the dashboard.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

import kmnist_sweep  # noqa: F401  (torchvision compat first)
from tests.sweep.test_multi_objective import SMALL_FULL, TWO, cli

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / "test-artifacts" / "dashboard.png"
SCREENSHOT_RUNNER = REPO / "test-artifacts" / "dashboard-multi-objective.png"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
STUDY = "dashboard-smoke-kmnist"
TIMEOUT_S = 30  # seconds for the server to answer and for the page to render
CHROME_FLAGS = [
    "--headless",
    "--no-sandbox",  # CI containers run as root, where Chromium's sandbox cannot start
    "--disable-gpu",
    "--disable-dev-shm-usage",  # small /dev/shm in containers
    "--disable-background-networking",  # no update checks or other traffic beyond the page
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--window-size=1280,800",
]


def require(found: bool, what: str) -> None:
    """Skip locally when a browser dependency is missing; fail in CI."""
    if found:
        return
    message = f"{what} not found; install it with `sudo .ci/browser-deps`"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def dashboard_command() -> str | None:
    # The console script beside this interpreter first (a virtualenv), then PATH.
    beside = Path(sys.executable).with_name("optuna-dashboard")
    return str(beside) if beside.is_file() else shutil.which("optuna-dashboard")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_study(storage: str) -> int:
    """Five trials in every state the runner produces: 3 complete, 1 pruned, 1 failed."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rdb = optuna.storages.RDBStorage(storage)
    study = optuna.create_study(study_name=STUDY, storage=rdb, direction="maximize")
    for number, state in enumerate(["complete"] * 3 + ["pruned", "failed"]):
        trial = study.ask()
        lr = trial.suggest_float("trainer.lr", 1e-4, 1e-1, log=True)
        trial.suggest_int("trainer.batch_size", 32, 2048, log=True)
        for epoch in (1, 2):
            trial.report(0.5 + 0.1 * epoch + lr, epoch)
        if state == "complete":
            study.tell(trial, 0.7 + 0.01 * number)
        else:
            study.tell(trial, state=TrialState.PRUNED if state == "pruned" else TrialState.FAIL)
    return rdb.get_study_id_from_name(STUDY)


@dataclass
class Dashboard:
    url: str
    study_id: int
    server: subprocess.Popen[bytes]
    log_path: Path

    def wait_until_up(self) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                pytest.fail(f"optuna-dashboard exited with {self.server.returncode}: {self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/api/studies", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        pytest.fail(f"optuna-dashboard did not answer within {TIMEOUT_S} s: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def require_browser() -> str:
    """The optuna-dashboard command, once Chromium and its driver are known to be there."""
    require(CHROMIUM.is_file(), str(CHROMIUM))
    require(CHROMEDRIVER.is_file(), str(CHROMEDRIVER))
    command = dashboard_command()
    require(command is not None, "optuna-dashboard")
    assert command is not None
    return command


@pytest.fixture
def dashboard(tmp_path: Path) -> Iterator[Dashboard]:
    """optuna-dashboard starting on a fresh SQLite study; not waited for, so that Chromium
    starts meanwhile (each takes seconds on a small CI machine)."""
    command = require_browser()
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    with serve(command, storage, make_study(storage), tmp_path) as server:
        yield server


@pytest.fixture
def runner_dashboard(tmp_path: Path) -> Iterator[Dashboard]:
    """optuna-dashboard on the storage of a real two-objective sweep the runner wrote."""
    command = require_browser()
    done = cli(*SMALL_FULL, *TWO, "study.pruner.type=none", "study.n_trials=2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    storage = f"sqlite:///{tmp_path / 'storage' / 'full-synthetic.db'}"
    study_id = optuna.storages.RDBStorage(storage).get_study_id_from_name("full-synthetic")
    with serve(command, storage, study_id, tmp_path) as server:
        yield server


@contextmanager
def serve(command: str, storage: str, study_id: int, tmp_path: Path) -> Iterator[Dashboard]:
    """optuna-dashboard on `storage` as the README runs it, stopped afterwards."""
    port = free_port()
    log_path = tmp_path / "dashboard.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [command, storage, "--host", "127.0.0.1", "--port", str(port), "--quiet"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield Dashboard(f"http://127.0.0.1:{port}", study_id, server, log_path)
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """Headless Debian Chromium through /usr/bin/chromedriver, with a fresh profile."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*CHROME_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    # An explicit driver path keeps Selenium Manager from looking for (downloading) one.
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def body(browser: Any) -> str:
    from selenium.webdriver.common.by import By

    return str(browser.find_element(By.TAG_NAME, "body").text)


def wait_for(browser: Any, *texts: str) -> None:
    """Until the rendered page (not the HTML source: it is a React app) shows `texts`."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        WebDriverWait(browser, TIMEOUT_S).until(lambda _: all(t in body(browser) for t in texts))
    except TimeoutException:
        pytest.fail(f"{browser.current_url} never showed {texts}; it shows: {body(browser)!r}")


def test_dashboard_renders_the_study_in_chromium(dashboard: Dashboard, browser: Any) -> None:
    dashboard.wait_until_up()
    # The study list (what `optuna-dashboard URL` opens on) names the study ...
    browser.get(f"{dashboard.url}/dashboard")
    wait_for(browser, STUDY)
    # ... and its trial list counts every trial, whatever its state.
    browser.get(f"{dashboard.url}/dashboard/studies/{dashboard.study_id}/trials")
    wait_for(browser, STUDY, "5 Trials", "Complete", "Pruned", "Fail")
    SCREENSHOT.parent.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(SCREENSHOT))
    assert SCREENSHOT.stat().st_size > 0


def test_dashboard_names_the_metrics_of_a_study_the_runner_wrote(
    runner_dashboard: Dashboard, browser: Any
) -> None:
    runner_dashboard.wait_until_up()
    browser.get(f"{runner_dashboard.url}/dashboard")
    wait_for(browser, "full-synthetic")
    # The study page opens on the Pareto front, its axes named by the runner's metric names
    # (study.set_metric_names), not "Objective 0" and "Objective 1".
    browser.get(f"{runner_dashboard.url}/dashboard/studies/{runner_dashboard.study_id}")
    wait_for(browser, "full-synthetic", "Pareto Front", "val/acc", "speed/train_s")
    assert "Objective 0" not in body(browser)
    browser.get(f"{runner_dashboard.url}/dashboard/studies/{runner_dashboard.study_id}/trials")
    wait_for(browser, "2 Trials", "Complete", "speed/train_s")
    SCREENSHOT_RUNNER.parent.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(SCREENSHOT_RUNNER))
    assert SCREENSHOT_RUNNER.stat().st_size > 0
