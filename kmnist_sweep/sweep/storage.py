"""Study storages: open SQLite (WAL, busy timeout), PostgreSQL or journal files by URL,
mask their passwords, copy a study between them, and tell a lost storage from other errors.

    storage = open_storage("sqlite:///storage/x.db", heartbeat_interval=30)
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sqlite3
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.storages import BaseStorage
from optuna.trial import TrialState

from kmnist_sweep.errors import ConfigError, SweepStopped, error_line
from kmnist_sweep.files import check_writable_dir
from kmnist_sweep.masking import mask_url

SQLITE_BUSY_TIMEOUT_S = 60.0  # seconds a SQLite writer waits for the lock before failing


OPEN_ATTEMPTS = 5  # tries to open a storage that answers "database is locked"
# PostgreSQL advisory lock key held while a storage is opened (and maybe created).
CREATE_KEY = 0x6B6D6E697374


# What a storage that went away raises: lost connections, refused ones, failed commits.
STORAGE_ERRORS: tuple[type[Exception], ...] = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    optuna.exceptions.StorageInternalError,
)


def open_storage(
    url: str,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    max_retry: int | None = 2,
) -> BaseStorage:
    """Open (creating if needed) the storage named by `url`.

    `sqlite:///relative.db` / `sqlite:////abs.db`: parent folder created, WAL journal, a 60 s
    busy timeout. Any other SQLAlchemy URL (postgresql://user@host/db) goes to RDBStorage
    as is. `journal:///relative.log` / `journal:////abs.log`: Optuna's JournalFileBackend
    (no heartbeat, so a killed worker's trial is not retried). With `heartbeat_interval`,
    a running trial silent for `grace_period` seconds is failed and queued again, at most
    `max_retry` times (None: no limit).
    """
    if url.startswith("journal:"):
        return _open_journal(url)
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise ConfigError(
            f"study.storage={mask_url(url)!r} is not a storage URL "
            "(sqlite:///file.db, postgresql://user@host/db or journal:///file.log)"
        ) from None
    driver_url = _with_installed_driver(url, parsed)  # messages show the user's url
    engine_kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database not in ("", ":memory:") and not database.startswith("file:"):
            _prepare_sqlite_file(url, Path(database))
        engine_kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
    else:
        engine_kwargs["pool_pre_ping"] = True
    heartbeat: dict[str, Any] = {}
    if heartbeat_interval is not None:
        heartbeat = {
            "heartbeat_interval": int(heartbeat_interval),
            "grace_period": None if grace_period is None else int(grace_period),
            **_retry_callback(max_retry),
        }
    for attempt in range(OPEN_ATTEMPTS):
        try:
            with _creation_lock(parsed, driver_url), quiet_optuna_warnings():
                return optuna.storages.RDBStorage(
                    driver_url, engine_kwargs=engine_kwargs, **heartbeat
                )
        except Exception as exc:  # driver, network and schema errors all mean "cannot open"
            retry = _is_lock_error(exc) or _is_creation_race(exc)
            if retry and attempt + 1 < OPEN_ATTEMPTS:
                time.sleep(0.2 * 2**attempt)
                continue
            if isinstance(exc, sqlalchemy.exc.NoSuchModuleError):
                raise ConfigError(
                    f"cannot open study.storage={mask_url(url)!r}: unknown database "
                    f"{parsed.drivername!r} (sqlite:///file.db, postgresql://user@host/db or "
                    "journal:///file.log)"
                ) from None
            raise ConfigError(
                f"cannot open study.storage={mask_url(url)!r}: {_one_line(exc, url)}"
            ) from None
    raise AssertionError("unreachable")


@contextmanager
def _creation_lock(parsed: sqlalchemy.engine.URL, driver_url: str) -> Iterator[None]:
    """Held while a storage is opened: the first open of a new database creates Optuna's
    tables and version rows, and launchers started at one instant (a job array) would race
    to create them. PostgreSQL: a session advisory lock (released with its connection, so a
    killed process never keeps it); SQLite: a flock on the database's folder. Where neither
    can be had (another database, a folder that refuses locks, a server that is down), the
    open goes ahead alone: its own error says why, and a lost race is retried."""
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        with _folder_lock(Path(parsed.database or "").parent):
            yield
    elif backend == "postgresql":
        with _advisory_lock(driver_url):
            yield
    else:
        yield


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):  # no flock here (Windows), or no folder (in memory)
        yield
        return
    try:
        with suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def _advisory_lock(driver_url: str) -> Iterator[None]:
    try:
        engine = sqlalchemy.create_engine(driver_url, poolclass=sqlalchemy.pool.NullPool)
    except Exception:  # no driver: RDBStorage says why
        yield
        return
    try:
        connection = engine.connect()
    except Exception:  # down, refused: RDBStorage says why
        engine.dispose()
        yield
        return
    try:
        connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": CREATE_KEY})
        yield
    finally:
        with suppress(Exception):  # closing the session releases it in any case
            connection.close()
        engine.dispose()


def _open_journal(url: str) -> BaseStorage:
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    path = url.removeprefix("journal:").removeprefix("//")
    path = path[1:] if path.startswith("/") else path  # journal:///rel, journal:////abs
    if not path:
        raise ConfigError(f"study.storage={url!r}: journal URLs look like journal:///file.log")
    if not Path(path).parent.is_dir():
        check_writable_dir(Path(path).parent, f"cannot create the folder of study.storage={url!r}")
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(path))
    except OSError as exc:
        raise ConfigError(f"cannot open study.storage={url!r}: {exc}") from None


def _prepare_sqlite_file(url: str, path: Path) -> None:
    """Create the folder and switch the file to WAL: readers no longer block the writer."""
    if not path.parent.is_dir():
        check_writable_dir(path.parent, f"cannot create the folder of study.storage={url!r}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the folder of study.storage={url!r}: {exc}") from None
    for attempt in range(OPEN_ATTEMPTS):
        try:
            con = sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_S)
            try:
                # Persistent: set once per file, kept by every later connection.
                con.execute("PRAGMA journal_mode=WAL")
            finally:
                con.close()
            return
        except sqlite3.DatabaseError as exc:  # locked, unreadable, or not a database
            if _is_lock_error(exc) and attempt + 1 < OPEN_ATTEMPTS:
                time.sleep(0.2 * 2**attempt)
                continue
            raise ConfigError(f"cannot open study.storage={url!r}: {exc}") from None


def _with_installed_driver(url: str, parsed: sqlalchemy.engine.URL) -> str:
    """postgresql:// means psycopg (3) to SQLAlchemy >= 2.1; fall back to psycopg2 if that is
    the driver installed (our `postgres` extra installs psycopg2-binary)."""
    if parsed.drivername != "postgresql":
        return url
    if importlib.util.find_spec("psycopg") or not importlib.util.find_spec("psycopg2"):
        return url
    return parsed.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)


def _retry_callback(max_retry: int | None) -> dict[str, Any]:
    retry = None if max_retry is None else int(max_retry)
    with quiet_optuna_warnings():
        if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):  # Optuna >= 4.9
            callback = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=retry)
            return {"heartbeat_stale_trial_callback": callback}
        callback = optuna.storages.RetryFailedTrialCallback(max_retry=retry)
        return {"failed_trial_callback": callback}


def _is_creation_race(exc: BaseException) -> bool:
    """Another process created the tables or version rows between our check and insert."""
    text = str(exc).lower()
    return isinstance(exc, sqlalchemy.exc.IntegrityError) or "already exists" in text


def _is_lock_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "database is locked" in text or "database is busy" in text


def _one_line(exc: BaseException, url: str) -> str:
    """Why a storage did not open, in one line; the URL's own password masked as well (a
    driver may echo it in a form the URL pattern does not catch)."""
    if isinstance(exc, ImportError):
        return "its database driver is not installed (PostgreSQL: pip install psycopg2-binary)"
    text = error_line(exc)
    password = _password(url)
    return text.replace(password, "***") if password else text


def _password(url: str) -> str | None:
    try:
        return sqlalchemy.engine.make_url(url).password  # type: ignore[return-value]
    except sqlalchemy.exc.ArgumentError:
        return None


@contextmanager
def quiet_optuna_warnings() -> Iterator[None]:
    """Heartbeats and fail_stale_trials are 'experimental' in Optuna; say so once, in docs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


def copy_study(name: str, from_url: str, to_url: str) -> int:
    """Copy study `name` with its trials and attributes (LR-finder curves, search space) to
    another storage, e.g. SQLite -> PostgreSQL when a sweep outgrows one machine; the
    number of trials copied. The source is left as it is; an existing study of that name
    at the destination is an error, and so is a source with trials still running."""
    source = open_storage(from_url)
    try:
        study = optuna.load_study(study_name=name, storage=source)
    except KeyError:
        raise ConfigError(f"no study {name!r} in {mask_url(from_url)}") from None
    trials = study.get_trials(deepcopy=False)
    running = [t.number for t in trials if t.state == TrialState.RUNNING]
    if running:
        raise ConfigError(
            f"study {name!r} has running trials {running}: stop its sweep first (Ctrl-C), "
            "or wait for it to end"
        )
    target = open_storage(to_url)
    try:
        target.get_study_id_from_name(name)
    except KeyError:
        pass
    else:
        raise ConfigError(f"study {name!r} already exists in {mask_url(to_url)}")
    with quiet_optuna_warnings():
        optuna.copy_study(from_study_name=name, from_storage=source, to_storage=target)
    copied = optuna.load_study(study_name=name, storage=target).get_trials(deepcopy=False)
    if len(copied) != len(trials):  # never leave a half copy that looks like the study
        optuna.delete_study(study_name=name, storage=target)
        raise SweepStopped(f"copy of {name!r} held {len(copied)} of {len(trials)} trials")
    return len(copied)


def storage_cause(exc: BaseException) -> BaseException | None:
    """The lost-storage error behind `exc`: Optuna may raise another error (an assertion in
    its trial clean-up) while handling it."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, STORAGE_ERRORS):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
