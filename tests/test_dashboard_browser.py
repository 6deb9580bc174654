"""optuna-dashboard, as the README tells users to run it, rendered by a real headless Chromium.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

import kmnist_sweep  # noqa: F401  (torchvision compat first)

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "test-artifacts" / "dashboard.png"
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


@pytest.fixture
def dashboard(tmp_path: Path) -> Iterator[Dashboard]:
    """optuna-dashboard starting on a fresh SQLite study; not waited for, so that Chromium
    starts meanwhile (each takes seconds on a small CI machine)."""
    require(CHROMIUM.is_file(), str(CHROMIUM))
    require(CHROMEDRIVER.is_file(), str(CHROMEDRIVER))
    command = dashboard_command()
    require(command is not None, "optuna-dashboard")
    assert command is not None
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study_id = make_study(storage)
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


def test_dashboard_renders_the_study_in_chromium(dashboard: Dashboard, browser: Any) -> None:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def body() -> str:
        return str(browser.find_element(By.TAG_NAME, "body").text)

    def wait_for(*texts: str) -> None:
        """Until the rendered page (not the HTML source: it is a React app) shows `texts`."""
        try:
            WebDriverWait(browser, TIMEOUT_S).until(lambda _: all(t in body() for t in texts))
        except TimeoutException:
            pytest.fail(f"{browser.current_url} never showed {texts}; it shows: {body()!r}")

    dashboard.wait_until_up()
    # The study list (what `optuna-dashboard URL` opens on) names the study ...
    browser.get(f"{dashboard.url}/dashboard")
    wait_for(STUDY)
    # ... and its trial list counts every trial, whatever its state.
    browser.get(f"{dashboard.url}/dashboard/studies/{dashboard.study_id}/trials")
    wait_for(STUDY, "5 Trials", "Complete", "Pruned", "Fail")
    SCREENSHOT.parent.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(SCREENSHOT))
    assert SCREENSHOT.stat().st_size > 0
