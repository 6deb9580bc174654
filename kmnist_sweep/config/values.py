"""Type and range checks of single config values, as one-line ConfigErrors.

    check_number("trainer.lr", cfg.trainer.lr, low=0, low_open=True)
    -> ConfigError: trainer.lr='fast' is not a number > 0

The composed config is plain YAML without a schema, so `trainer.epochs=abc` composes fine;
these checks are what turn such a value into an error naming the key, the value and what
is allowed, before anything is trained or any study is touched.
"""

from __future__ import annotations

import math
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


def _num(x: float) -> str:
    return f"{x:g}"
