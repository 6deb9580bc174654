"""Type and range checks of single config values, as one-line ConfigErrors.

    check_number("trainer.lr", cfg.trainer.lr, low=0, low_open=True)
    -> ConfigError: trainer.lr='fast' is not a number > 0

The composed config is plain YAML without a schema, so `trainer.epochs=abc` composes fine;
these checks are what turn such a value into an error naming the key, the value and what
is allowed, before anything is trained or any study is touched.
"""

from __future__ import annotations

import math
import re
from typing import Any

from kmnist_sweep.errors import ConfigError


def check_number(
    key: str,
    value: Any,
    *,
    whole: bool = False,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    nullable: bool = False,
) -> Any:
    """`value` as an int (`whole`) or a finite float within the bounds, else a ConfigError.

    `low`/`high` are inclusive unless `low_open`/`high_open`; `nullable` also allows None.
    """
    if value is None and nullable:
        return None
    ok = not isinstance(value, bool) and isinstance(value, int if whole else int | float)
    if ok:
        number = int(value) if whole else float(value)
        ok = math.isfinite(number)
        if ok and low is not None:
            ok = number > low if low_open else number >= low
        if ok and high is not None:
            ok = number < high if high_open else number <= high
        if ok:
            return number
    raise ConfigError(
        f"{key}={value!r} is not {allowed(whole, low, high, low_open, high_open, nullable)}"
    )


def allowed(
    whole: bool = False,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    nullable: bool = False,
) -> str:
    """What check_number accepts, in words: "a whole number in 0-30", "a number in [0, 1)"."""
    kind = "a whole number" if whole else "a number"
    if low is not None and high is not None:
        if whole and not low_open and not high_open:
            text = f"{kind} in {_num(low)}-{_num(high)}"
        else:
            text = (
                f"{kind} in {'(' if low_open else '['}{_num(low)}, {_num(high)}"
                f"{')' if high_open else ']'}"
            )
    elif low is not None:
        text = f"{kind} {'>' if low_open else '>='} {_num(low)}"
    elif high is not None:
        text = f"{kind} {'<' if high_open else '<='} {_num(high)}"
    else:
        text = kind
    return text + (" or null" if nullable else "")


def check_choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    """`value` if it is one of `choices` (strings), else a ConfigError listing them."""
    if isinstance(value, str) and value in choices:
        return value
    raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}")


DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0}  # seconds per unit of a duration
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")


def duration_s(key: str, value: Any) -> float | None:
    """A wall-clock duration in seconds: `90s`, `15m`, `2h`, `1h30m`, or a number of seconds;
    null stays None. Anything else, or not above zero, is a ConfigError."""
    if value is None:
        return None
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        match = _DURATION.fullmatch(text)
        if match and text:
            parts = zip(match.groups(), DURATION_UNITS.values(), strict=True)
            seconds = sum(float(n) * unit for n, unit in parts if n is not None)
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(
            f"{key}={value!r} is not a duration above zero: e.g. 90s, 15m, 2h, 1h30m or "
            "a number of seconds"
        )
    return seconds


def _num(x: float) -> str:
    return f"{x:g}"
