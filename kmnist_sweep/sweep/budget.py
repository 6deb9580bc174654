"""Plan a sweep inside a wall-clock budget (`study.budget`): pure functions of what the
study has measured, no Optuna and no clock of their own.

Successive halving over epochs: every new trial runs the first rung's epochs; one in
`keep` of the trials finished at a rung is trained again, from scratch, at the next rung's
epochs (one-cycle's schedule depends on its length, so a rung cannot resume a shorter
run). The answer is the best trial of the highest rung reached; the final fit retrains it
on train + valid, and its time is held back from the search from the start.

    step = next_step(seen, left_s, rungs=[3, 10], keep=3, rate=per_epoch(seen))

Costs are learned, not assumed: seconds per epoch come from the trials that finished, so
every decision re-plans with what the machine does now. No trial starts unless it ends
inside the search's share of the budget at that rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# Margins on measured costs: the machine's speed moves between trials (other processes, a
# different batch size), and running over the budget is worse than ending a little early.
TRIAL_MARGIN = 1.1  # x seconds per epoch, for a trial
FINAL_MARGIN = 1.25  # x the final fit's estimate: the one phase that cannot be skipped
RECENT = 3  # trials whose mean rate counts


@dataclass(frozen=True)
class Seen:
    """One trial as the planner sees it."""

    number: int
    rung: int  # index into the rungs
    source: int  # the trial whose sampled config this runs (itself at rung 0)
    state: str  # complete | pruned | failed | running | waiting
    value: float | None  # oriented: higher is better
    seconds: float | None  # wall time from start to end, finished trials
    epochs: int
    train_seconds: float | None = None  # of those, training only (the trial's curve)


@dataclass(frozen=True)
class Step:
    """What a free worker does next."""

    kind: str  # new | promote | wait | stop
    rung: int = 0
    epochs: int = 0
    source: int | None = None  # promote: the config's trial
    why: str = ""


def rung_epochs(rungs: Sequence[int] | None, keep: int, top: int) -> list[int]:
    """The rungs' epochs: as given, else `top` and `top` / keep, / keep**2 while >= 1 epoch
    (three rungs at most: below that a schedule is too short to rank a recipe)."""
    if rungs:
        return [int(e) for e in rungs]
    found = [top]
    while len(found) < 3 and round(found[0] / keep) >= 1 and round(found[0] / keep) < found[0]:
        found.insert(0, round(found[0] / keep))
    return found


def per_epoch(seen: Sequence[Seen]) -> float | None:
    """Seconds per epoch of a trial, overheads included, with its margin. None before any
    trial finished."""
    rate = _recent_rate(seen, lambda t: t.seconds)
    return None if rate is None else TRIAL_MARGIN * rate


def per_train_epoch(seen: Sequence[Seen]) -> float | None:
    """Training seconds per epoch, without a trial's start-up, per-epoch validation and
    margin: the final fit has none of those, so its time is held from this. None where no
    finished trial recorded its training time."""
    return _recent_rate(seen, lambda t: t.train_seconds)


def _recent_rate(seen: Sequence[Seen], seconds: Callable[[Seen], float | None]) -> float | None:
    """`seconds` per epoch of the finished trials: the larger of the last one's and the mean
    of the last few (a machine that slowed down counts at once, one that sped up only on
    average). None where no finished trial has `seconds`."""
    done = sorted(
        (t for t in seen if t.state == "complete" and seconds(t) and t.epochs > 0),
        key=lambda t: t.number,
    )
    rates = [(seconds(t) or 0.0) / t.epochs for t in done[-RECENT:]]
    return max(rates[-1], sum(rates) / len(rates)) if rates else None


def fit_rate(seen: Sequence[Seen], rate: float) -> float:
    """Seconds per epoch of the final fit: measured training time, else a trial's `rate`."""
    return per_train_epoch(seen) or rate


def final_seconds(rate: float, epochs: int, scale: float) -> float:
    """The final fit's estimate: `epochs` on `scale` x the trial's training images, plus the
    test evaluation (several views per image: about one epoch), with its margin."""
    return FINAL_MARGIN * rate * (epochs * scale + 1)


def answer_rung(
    seen: Sequence[Seen], until_end_s: float, rungs: Sequence[int], rate: float, scale: float
) -> int:
    """The rung whose final fit the time is held for: the highest one a trial completed, or
    higher where one trial of it and its final fit still fit in `until_end_s` (a budget
    too short for the top rung plans for the rung below rather than end with time unused)."""
    done = max((t.rung for t in seen if t.state == "complete"), default=0)
    fit = fit_rate(seen, rate)
    for rung in reversed(range(done + 1, len(rungs))):
        if rate * rungs[rung] + final_seconds(fit, rungs[rung], scale) <= until_end_s:
            return rung
    return done


def plan(left_s: float, workers: int, rungs: Sequence[int], keep: int, rate: float) -> list[int]:
    """Trials per rung that fit in `left_s` on `workers`: n, n // keep, n // keep**2, ...
    with the largest n whose total time fits (what the steps will do if costs hold)."""

    def total(n: int) -> float:
        return sum(n // keep**r * rate * e for r, e in enumerate(rungs))

    capacity = left_s * max(workers, 1)
    n = 0
    while total(n + 1) <= capacity:
        n += 1
    return [n // keep**r for r in range(len(rungs))]


def next_step(
    seen: Sequence[Seen],
    until_end_s: float,
    rungs: Sequence[int],
    keep: int,
    rate: float | None,
    scale: float,
) -> Step:
    """The next trial for a free worker, `until_end_s` seconds before the budget ends.

    A trial finished at a rung goes on to the next once it is in the best 1/keep of those
    finished there (asynchronous successive halving: no worker waits for a rung to fill).
    Once a new trial of a rung could no longer reach the next in time, the time goes to the
    best trials of that rung not yet promoted, whatever their rank. Nothing starts that
    would not end, with the final fit of the answer's rung after it, inside the budget; nor
    at a rung below the answer's that could not go on. `scale`: the final fit's training
    images over a trial's.
    """
    if rate is None:  # nothing finished yet: the first trials are the measurement
        if until_end_s <= 0:
            return Step("stop", why="no time left")
        return Step("new", 0, rungs[0], why="the first trials measure the cost")
    cost = [rate * e for e in rungs]
    fit = fit_rate(seen, rate)
    top = len(rungs) - 1
    done = max((t.rung for t in seen if t.state == "complete"), default=0)

    def ends_by(*chain: int) -> bool:  # these rungs one after another, then the final fit
        answer = max(done, chain[-1])
        spent = sum(cost[r] for r in chain) + final_seconds(fit, rungs[answer], scale)
        return spent <= until_end_s

    def useful(rung: int) -> bool:  # fits, and is the answer's rung or can still go on
        if not ends_by(rung):
            return False
        if rung == top or ends_by(rung, rung + 1):
            return True
        return not any(t.rung > rung and t.state != "failed" for t in seen)

    for r in reversed(range(top)):
        if not useful(r + 1):
            continue
        late = not ends_by(r, r + 1)  # a new trial of rung r could not get there
        pick = promotable(seen, r, keep, any_rank=late)
        if pick is not None:
            why = "the best not yet promoted" if late else f"in the best 1/{keep}"
            return Step("promote", r + 1, rungs[r + 1], pick.source, why)
    if useful(0):
        return Step("new", 0, rungs[0], why="a new config")
    if any(t.state in ("running", "waiting") for t in seen):
        return Step("wait", why="running trials may make one worth promoting")
    return Step("stop", why=f"no trial fits in the {max(until_end_s, 0):.0f} s left")


def promotable(seen: Sequence[Seen], rung: int, keep: int, any_rank: bool) -> Seen | None:
    """The best trial finished at `rung` whose config has not gone on to the next rung, if
    it is in the best 1/keep of the rung's finished trials (or `any_rank`)."""
    here = [t for t in seen if t.rung == rung and t.state in ("complete", "pruned")]
    ranked = sorted(
        (t for t in here if t.state == "complete" and t.value is not None),
        key=lambda t: -(t.value or 0.0),
    )
    went_on = {t.source for t in seen if t.rung == rung + 1}
    quota = len(here) // keep
    for rank, t in enumerate(ranked):
        if t.source in went_on:
            continue
        return t if any_rank or rank < quota else None
    return None


def choose(seen: Sequence[Seen]) -> Seen | None:
    """The answer: the best complete trial of the highest rung any trial completed."""
    complete = [t for t in seen if t.state == "complete" and t.value is not None]
    if not complete:
        return None
    top = max(t.rung for t in complete)
    return max((t for t in complete if t.rung == top), key=lambda t: t.value or -math.inf)


def per_rung(seen: Sequence[Seen], n_rungs: int) -> list[dict[str, int]]:
    """What happened at each rung: trials by state."""
    counts: list[dict[str, int]] = [{} for _ in range(n_rungs)]
    for t in seen:
        if 0 <= t.rung < n_rungs:
            counts[t.rung][t.state] = counts[t.rung].get(t.state, 0) + 1
    return counts
