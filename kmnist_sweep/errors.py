"""The exception types a user sees as a single line, never as a traceback."""

from __future__ import annotations

import signal

from kmnist_sweep.masking import scrub_text


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


def error_line(exc: BaseException, *, typed: bool = True, last: bool = False) -> str:
    """An error as one line for a message, a log or a trial attribute, secrets masked.

    typed:  `Type: first line` of the error behind it (a driver's `orig`, or the cause);
            otherwise the message of `exc` itself (all of it, whitespace collapsed, unless
            `last`).
    last:   the last line instead of the first (fastai prefixes a callback's error with
            "Exception occured in ...:", so the original message is the last line).
    """
    if not typed and not last:
        return scrub_text(" ".join(str(exc).split()) or type(exc).__name__)
    cause = exc if last or not typed else (getattr(exc, "orig", None) or exc.__cause__ or exc)
    lines = [line.strip() for line in str(cause).strip().splitlines() if line.strip()]
    text = (lines[-1] if last else lines[0]) if lines else ""
    if not typed:
        return scrub_text(text or type(cause).__name__)[:500]
    return scrub_text(f"{type(cause).__name__}: {text}")[:500]
