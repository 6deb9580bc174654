"""One run of a budgeted sweep (`study.budget`), around the runner's workers: the clock
(time spent by earlier runs counts), the plan shown as it is learned, then the final fit
of the answer inside the budget, the report, the figure and the summary.

    run = BudgetRun.start(cfg, study, started, workers)    # None: not budgeted
    ... workers with planner=run.budget.step ...
    chosen = run.search_done()
    summary = run.finish(summary, out_dir, report, run_final)
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import optuna
from omegaconf import DictConfig

from kmnist_sweep import trial_attrs
from kmnist_sweep.errors import SweepStopped, error_line
from kmnist_sweep.results.budget_figure import BUDGET_FIGURE, TrialSpan, plot_budget
from kmnist_sweep.results.outputs import SweepSummary
from kmnist_sweep.sweep import budgeted
from kmnist_sweep.sweep.budget import (
    answer_rung,
    final_seconds,
    fit_rate,
    per_epoch,
    per_rung,
    plan,
)
from kmnist_sweep.sweep.budgeted import Budget, clock
from kmnist_sweep.sweep.storage import STORAGE_ERRORS

log = logging.getLogger(__name__)


class Fitted(Protocol):
    """What `final`'s fit returns (sweep/final.FinalResult), as far as a budget reads it."""

    @property
    def bundle(self) -> Path: ...
    @property
    def metrics(self) -> dict[str, float]: ...


# `final`'s fit (sweep/final.run_final), handed in by the CLI: the runner's imports stay
# clear of the training stack, so bad input is answered before it loads.
FinalFit = Callable[..., Fitted]
NO_FINAL_FIT = (
    "study.budget ends with the final fit: run_sweep needs final_fit=run_final "
    "(python -m kmnist_sweep passes it)"
)

# Held back from the search and the final fit for what follows them: the report, the
# figure, the summary and the process's exit.
OUTPUTS_SHARE = 0.03  # of the budget
OUTPUTS_MIN_S = 20.0  # seconds
SAVE_EVERY_S = 10.0  # seconds between writes of the time spent, while trials run


@dataclass
class BudgetRun:
    cfg: DictConfig
    study: optuna.Study
    budget: Budget
    budget_s: float
    started: float  # this run's start (Unix time)
    spent_before: float  # seconds earlier runs of the study used
    workers: int
    planned: dict[str, Any] | None = None  # the plan once the first trial measured the cost
    searched: float | None = None  # when the search ended
    saved: float = 0.0
    record: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def start(
        cls, cfg: DictConfig, study: optuna.Study, started: float, workers: int
    ) -> BudgetRun | None:
        budget_s = budgeted.budget_s(cfg)
        if budget_s is None:
            return None
        spent = budgeted.spent_s(study)
        reserve = max(OUTPUTS_MIN_S, OUTPUTS_SHARE * budget_s)
        end = started + budget_s - spent - reserve
        run = cls(cfg, study, Budget.from_config(cfg, end), budget_s, started, spent, workers)
        rungs = ", ".join(str(e) for e in run.budget.rungs)
        log.info(
            "budget %s: %s used by earlier runs, %s left; rungs of %s epochs, 1 in %d goes "
            "on; the first trials measure the cost",
            clock(budget_s),
            clock(spent),
            clock(budget_s - spent - (time.time() - started)),
            rungs,
            run.budget.keep,
        )
        return run

    def reserve(self) -> float:
        """Seconds held back for the report and the exit."""
        return self.budget_s - self.spent_before - (self.budget.end - self.started)

    def elapsed(self) -> float:
        """Seconds of the budget used so far, earlier runs included."""
        return self.spent_before + time.time() - self.started

    def progress_status(self) -> str:
        """The bar's phase and time left; records the time spent, and the plan once the
        first trial has measured what an epoch costs."""
        now = time.time()
        if now - self.saved >= SAVE_EVERY_S:
            self.saved = now
            try:
                budgeted.save_spent(self.study, self.elapsed())
                self.note_plan()
            except STORAGE_ERRORS:
                pass  # the workers wait for the storage; so does the accounting
        return self.budget.status()

    def note_plan(self) -> None:
        if self.planned is not None:
            return
        trials = self.study.get_trials(deepcopy=False)
        seen = budgeted.seen_of(self.study, trials, self.budget.rungs)
        rate = per_epoch(seen)
        if rate is None:
            return
        rungs, scale = self.budget.rungs, self.budget.scale
        top = answer_rung(seen, self.budget.end - time.time(), rungs, rate, scale)
        final = final_seconds(fit_rate(seen, rate), rungs[top], scale)
        left = self.budget.end - time.time() - final
        rungs = rungs[: top + 1]
        counts = plan(left, self.workers, rungs, self.budget.keep, rate)
        self.planned = {
            "s_per_epoch": round(rate, 2),
            "trials": counts + [0] * (len(self.budget.rungs) - len(counts)),
            "final_s": round(final),
            "after_trial": max(t.number for t in seen if t.state == "complete"),
        }
        log.info("plan: %s", plan_text(self.planned, self.budget.rungs))
        if left < 0:  # the first trial runs unmeasured: here it already took too long
            log.warning(
                "study.budget=%s is short on this machine: %s went to start-up and the first "
                "trial, and the final fit needs about %s more; the command will end after "
                "the budget (give it at least %s)",
                clock(self.budget_s),
                clock(self.elapsed()),
                clock(final),
                clock(self.elapsed() + final + self.reserve()),
            )

    def search_done(self) -> int | None:
        """The end of the search: the answer's trial number (None: no trial completed)."""
        self.searched = time.time()
        try:
            self.note_plan()
            budgeted.save_spent(self.study, self.elapsed())
            chosen = budgeted.answer(self.study, self.budget.rungs)
        except STORAGE_ERRORS as exc:
            log.warning("budget: the storage did not answer (%s)", error_line(exc))
            return None
        return None if chosen is None else chosen.number

    def finish(
        self,
        summary: SweepSummary,
        out_dir: Path,
        report: Callable[[], None],
        run_final: FinalFit,
    ) -> SweepSummary:
        """The final fit of the answer, the report and the figure; the summary's lines."""
        chosen = budgeted.answer(self.study, self.budget.rungs)
        if chosen is None:
            raise SweepStopped(
                f"study {self.study.study_name}: no trial completed inside the budget of "
                f"{clock(self.budget_s)}; a longer study.budget gives the first trials time"
            )
        fit_start = time.time()
        tested, bundle = self.earlier_fit(chosen.number, out_dir)
        if bundle is None:
            result = run_final(out_dir, trial=chosen.number, storage=str(self.cfg.study.storage))
            tested, bundle = result.metrics, result.bundle
        final_end = time.time()
        figure = out_dir / "report" / BUDGET_FIGURE
        self.figure(figure, fit_start, final_end, last=False)  # for the report's page
        try:
            report()
        except Exception as exc:
            log.warning("could not write the report: %s", error_line(exc))
        self.record = self.run_record(chosen, tested, bundle, fit_start, final_end)
        self.figure(figure, fit_start, final_end, last=True)
        self.record["total_s"] = round(time.time() - self.started, 1)
        budgeted.record_run(self.study, self.record)
        budgeted.save_spent(self.study, self.elapsed())
        lines = summary_lines(self.record, self.budget.rungs, str(self.cfg.study.metric))
        return replace(summary, budget=[*lines, f"figure: {figure}"])

    def earlier_fit(self, number: int, out_dir: Path) -> tuple[dict[str, float], Path | None]:
        """An earlier run's final fit of this same answer, its bundle still there: a study
        resumed with nothing left to search is not fit again."""
        for record in reversed(self.study.user_attrs.get(trial_attrs.BUDGET_RUNS, [])):
            bundle = Path(str(record.get("bundle", "")))
            if record.get("answer", {}).get("trial") == number and bundle.is_file():
                log.info("budget: trial %d's final fit is already in %s", number, bundle)
                return dict(record.get("test", {})), bundle
        return {}, None

    def run_record(
        self,
        chosen: optuna.trial.FrozenTrial,
        metrics: dict[str, float],
        bundle: Path,
        fit_start: float,
        final_end: float,
    ) -> dict[str, Any]:
        trials = self.study.get_trials(deepcopy=False)
        seen = budgeted.seen_of(self.study, trials, self.budget.rungs)
        searched = self.searched or fit_start
        return {
            "started": datetime.datetime.fromtimestamp(self.started).isoformat(),
            "budget_s": self.budget_s,
            "spent_before_s": round(self.spent_before, 1),
            "search_s": round(searched - self.started, 1),
            "final_s": round(final_end - fit_start, 1),
            "planned": self.planned,
            "trials": per_rung(seen, len(self.budget.rungs)),
            "answer": {
                "trial": chosen.number,
                "rung": int(chosen.user_attrs.get(trial_attrs.BUDGET_RUNG, 0)),
                "value": chosen.value,
                "overrides": trial_attrs.overrides_of(chosen.user_attrs),
            },
            "test": {k: v for k, v in metrics.items()},
            "bundle": str(bundle),
        }

    def figure(self, path: Path, fit_start: float, final_end: float, last: bool) -> None:
        """Trials over wall time by rung, the final fit and the budget line; drawn `last`,
        also when the command ended."""
        spans = []
        for t in self.study.get_trials(deepcopy=False):
            if t.datetime_start is None or t.datetime_complete is None:
                continue
            start = t.datetime_start.timestamp() - self.started + self.spent_before
            end = t.datetime_complete.timestamp() - self.started + self.spent_before
            if start < self.spent_before:
                continue  # an earlier run's: its clock is not this one
            rung = int(t.user_attrs.get(trial_attrs.BUDGET_RUNG, 0))
            spans.append(TrialSpan(t.number, rung, start, end, t.state.name.lower()))
        offset = self.spent_before - self.started
        final = (fit_start + offset, final_end + offset)
        ended = time.time() + offset if last else None  # the command ends about now
        try:
            plot_budget(
                spans, self.budget.rungs, self.budget_s, final, self.spent_before, path, ended
            )
        except (OSError, ValueError) as exc:
            log.warning("could not draw %s: %s", path, error_line(exc))


def plan_text(planned: dict[str, Any], rungs: list[int]) -> str:
    trials = ", ".join(f"{n} of {e} epochs" for n, e in zip(planned["trials"], rungs, strict=True))
    return (
        f"{trials}, then the final fit (about {clock(planned['final_s'])} held for it), at "
        f"{planned['s_per_epoch']:.1f} s per epoch measured by trial {planned['after_trial']}"
    )


def summary_lines(record: dict[str, Any], rungs: list[int], metric: str) -> list[str]:
    """What the budget planned and what happened, for the command's last lines."""
    total, budget = float(record["total_s"]), float(record["budget_s"])
    lines = [
        f"budget {clock(budget)}: search {clock(record['search_s'])}, final fit "
        f"{clock(record['final_s'])}; this run ended at {clock(total)}"
        + (
            f" after {clock(record['spent_before_s'])} of earlier runs"
            if record["spent_before_s"]
            else ""
        )
        + f" ({100 * (total + record['spent_before_s']) / budget:.1f}% of the budget)",
    ]
    if record["planned"]:
        lines.append(f"planned: {plan_text(record['planned'], rungs)}")
    ran = "; ".join(
        f"{e} epochs: "
        + (", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "none")
        for e, counts in zip(rungs, record["trials"], strict=True)
    )
    lines.append(f"ran: {ran}")
    answer = record["answer"]
    lines.append(
        f"answer: trial {answer['trial']} ({rungs[answer['rung']]} epochs), {metric} "
        f"{answer['value']:.4f}: {' '.join(answer['overrides'])}"
    )
    tested = ", ".join(f"{k} {v:.4f}" for k, v in record["test"].items() if k != "test/images")
    lines.append(f"final: {tested} on {int(record['test'].get('test/images', 0))} test images")
    lines.append(f"bundle: {record['bundle']}")
    return lines
