"""The exception types a user sees as a single line, never as a traceback."""

from __future__ import annotations

import signal


class UserError(Exception):
    """Bad input (config, files, URLs, storage): __main__ prints it on one line and exits 2."""


class ConfigError(UserError):
    """A composed config or search space that cannot be used."""


class DataError(UserError):
    """A dataset file that is missing, truncated, corrupt or of the wrong shape."""


class SweepStopped(RuntimeError):
    """A sweep stopped short of its total for a reason that is not bad input (storage lost,
    too many failing trials, crashed workers). The study holds everything finished so far;
    __main__ prints one line and exits 1, and the same command resumes it."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM stopped the run. A KeyboardInterrupt, so that Optuna fails
    the running trial and re-raises it like a Ctrl-C; `exit_code` is the shell's 128 + N."""

    def __init__(self, message: str = "", signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)
