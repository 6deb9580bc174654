"""Weights & Biases tracking: one wandb run per trial, grouped by study.

This is the only module that imports wandb. Tracking is a side channel: a wandb failure
(network, disk, a bug in wandb) must never fail a trial, so every wandb call
goes through `Tracker._guard`, which logs one warning and then stays quiet until the next
trial. Offline runs are written under `<tracking.dir>/wandb/offline-run-*` and uploaded
later with `wandb sync`.

Configs pass through `masking.scrub` before they reach wandb (or its debug logs): storage URLs
carry database passwords and a config may hold tokens.
"""

from __future__ import annotations

import contextlib
import logging
import netrc
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from omegaconf import DictConfig

from kmnist_sweep.errors import error_line
from kmnist_sweep.masking import scrub, scrub_text

if TYPE_CHECKING:
    from wandb import Run

log = logging.getLogger(__name__)

MODES = ("online", "offline", "disabled")
TRIAL_STATES = ("complete", "pruned", "failed")
_service_up = False  # wandb's service process was started by a run of ours and not stopped
_unreachable = False  # an online run could not start: this process writes offline runs


# ---------------------------------------------------------------- mode


def resolve_mode(cfg: DictConfig | Mapping[str, Any]) -> str:
    """The wandb mode to use: `online` only when asked for and an API key is configured
    (WANDB_API_KEY or a netrc entry for the W&B host), else `offline`, or `disabled`.

    WANDB_MODE=offline|disabled in the environment can only lower the mode, so exporting it
    is a reliable way to keep a run off the network. `tracking.mode` is one of MODES: the
    config's check (config/schema.py) saw to that before any work.
    """
    mode = str(cfg["mode"])
    env = os.environ.get("WANDB_MODE", "").lower()
    if env in ("disabled", "offline") and MODES.index(env) > MODES.index(mode):
        mode = env
    if mode == "online" and not api_key_configured():
        log.warning(
            "tracking.mode=online but no W&B API key (set WANDB_API_KEY or run `wandb login`); "
            "writing offline runs instead, upload them later with `wandb sync`"
        )
        return "offline"
    return mode


def api_key_configured() -> bool:
    """True when WANDB_API_KEY is set or the netrc file has a password for the W&B host.
    Reads local files only: deciding the mode must not touch the network."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or ""
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc")).expanduser()
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


# ---------------------------------------------------------------- the tracker


class Tracker:
    """One per worker process; at most one wandb run (one trial) open at a time."""

    def __init__(self, cfg: DictConfig, study_name: str) -> None:
        self.mode = resolve_mode(cfg)
        if self.mode != "disabled":
            try:
                import wandb  # noqa: F401  (here, so that a missing wandb costs one warning)
            except ImportError as err:
                log.warning("tracking.mode=%s but wandb cannot be imported (%s)", self.mode, err)
                self.mode = "disabled"
        self.project = str(cfg.project)
        self.entity: str | None = cfg.entity or None
        # cfg.dir is ${study.output_dir} by default; wandb adds its own `wandb/` below it.
        self.dir = Path(str(cfg.dir))
        self.init_timeout = float(cfg.init_timeout)  # seconds
        self.study_name = study_name
        self.run: Run | None = None
        self.broken = False  # a wandb call failed: stay quiet until the next trial
        self.trial: int | None = None

    @property
    def enabled(self) -> bool:
        return self.mode != "disabled"

    def start_trial(self, number: int, config: Mapping[str, Any]) -> None:
        """Open the run `trial-<number>` in the study's group (closing a forgotten one)."""
        if not self.enabled:
            return
        if self.run is not None:
            self._finish(exit_code=1)  # the previous trial never reached end_trial
        self.trial, self.broken = number, False
        with self._guard("init"):
            self.run = self._init(f"trial-{number}", "trial", scrub(config))
            # Each trial is its own run, but "epoch" is the x axis everywhere, so a trial
            # that restarts (batch-size fallback) or several workers never fight over steps.
            self.run.define_metric("epoch")
            self.run.define_metric("*", step_metric="epoch")

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        if self.run is None or self.broken:
            return
        with self._guard("log"):
            self.run.log({"epoch": epoch, **metrics})

    def log_image(self, key: str, path: Path) -> None:
        """Attach a PNG (e.g. the LR-finder curve) to the open trial's run."""
        if self.run is None or self.broken:
            return
        with self._guard("log_image"):
            import wandb

            self.run.log({key: wandb.Image(str(path))})

    def end_trial(
        self, state: str, reason: str = "", summary: Mapping[str, Any] | None = None
    ) -> None:
        """Put how the trial ended (complete|pruned|failed) in the run summary; close the run."""
        if self.run is None:
            return
        if state not in TRIAL_STATES:
            log.warning("end_trial: state %r is not one of %s", state, TRIAL_STATES)
        if not self.broken:
            with self._guard("summary"):
                self.run.summary.update(
                    {"state": state, "reason": scrub_text(reason), **scrub(summary or {})}
                )
                self.run.tags = (*(self.run.tags or ()), state)
        # A failed trial shows as failed in the W&B UI; a pruned one finished normally.
        self._finish(exit_code=1 if state == "failed" else 0)

    def log_study_summary(self, summary: Mapping[str, Any], images: Mapping[str, Path]) -> None:
        """A separate run (job_type "study-summary") with the study's results and plots."""
        if not self.enabled:
            return
        import wandb

        saved = self.run, self.broken, self.trial
        self.run, self.broken, self.trial = None, False, None
        with self._guard("study summary"):
            run = self._init(f"{self.study_name}-summary", "study-summary", {})
            try:
                run.summary.update(scrub(summary))
                if images:
                    run.log({key: wandb.Image(str(path)) for key, path in images.items()})
            finally:
                run.finish()
        self.run, self.broken, self.trial = saved

    def close(self) -> None:
        """Finish any open run and stop wandb's service process; call once when the worker
        is done. Only then are the last records of offline runs certain to be on disk."""
        if not self.enabled:
            return
        self._finish(exit_code=1)
        global _service_up
        if _service_up:  # one service per process: a second tracker's close finds it stopped
            _service_up = False
            try:
                sys.modules["wandb"].teardown()
            except Exception as err:  # at exit wandb's own atexit hook may have run first
                log.debug("wandb teardown: %s", _describe(err))

    # ---------------------------------------------------------------- wandb calls

    def _init(self, name: str, job_type: str, config: dict[str, Any]) -> Run:
        global _unreachable
        if self.mode == "online" and _unreachable:
            self.mode = "offline"
        try:
            return self._start(name, job_type, config)
        except Exception as err:
            if self.mode != "online":
                raise
            # W&B is down or the key is refused: waiting init_timeout on every trial would
            # cost more than the training, so keep the runs on disk instead.
            log.warning(
                "wandb is unreachable (%s); this process writes offline runs from now on, "
                "upload them later with `wandb sync %s`",
                _describe(err),
                self.dir / "wandb",
            )
            _unreachable, self.mode = True, "offline"
            return self._start(name, job_type, config)

    def _start(self, name: str, job_type: str, config: dict[str, Any]) -> Run:
        # Read when wandb starts its service process: no banner lines on stdout, and in
        # offline mode no crash reports to Sentry either (offline means no network).
        os.environ.setdefault("WANDB_SILENT", "true")
        if self.mode == "offline":
            os.environ["WANDB_ERROR_REPORTING"] = "false"
        import wandb

        global _service_up
        _service_up = True
        self.dir.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(
            console="off",  # workers' own logs stay readable; no stdout capture thread
            silent=True,
            quiet=True,
            x_disable_stats=True,  # no system-metrics sampler beside the training
            x_save_requirements=False,
            disable_code=True,
            disable_git=True,
            init_timeout=self.init_timeout,
        )
        return wandb.init(
            project=self.project,
            entity=self.entity,
            dir=str(self.dir),
            group=self.study_name,
            job_type=job_type,
            name=name,
            config=config,
            mode=self.mode,  # type: ignore[arg-type]
            reinit="create_new",  # several runs per process; we close each ourselves
            settings=settings,
        )

    def _finish(self, exit_code: int) -> None:
        run, self.run = self.run, None
        if run is None:
            return
        if self.broken:
            # Already warned about this trial; still try to release wandb's resources.
            try:
                run.finish(exit_code=exit_code)
            except Exception as err:
                log.debug("wandb finish after an earlier error failed: %s", _describe(err))
            return
        with self._guard("finish"):
            run.finish(exit_code=exit_code)

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """Turn any exception into one warning; later calls for this trial become no-ops."""
        try:
            yield
        except Exception as err:  # wandb raises many kinds; none may escape
            if not self.broken:
                trial = f" for trial {self.trial}" if self.trial is not None else ""
                log.warning(
                    "wandb %s failed%s (%s); tracking is off until the next trial",
                    what,
                    trial,
                    _describe(err),
                )
            self.broken = True


def _describe(err: BaseException) -> str:
    return error_line(err, typed=False)[:300]
