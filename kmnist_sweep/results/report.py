"""Study report: PNG plots and one HTML page under `<out_dir>/report/`.

`write_report` draws Optuna's plots (history, importances, parallel coordinates, slices,
intermediate values; a multi-objective study's Pareto front first, and its one-objective
plots for its first metric), copies the LR-finder curves, and, given test predictions, a confusion
matrix and a grid of misclassified images labelled with the actual characters. A plot that
cannot be drawn (too few trials, one parameter) becomes a line in the page, never an error:
the report is written at the end of a sweep whose results must not be lost to a plot.
"""

from __future__ import annotations

import html
import logging
import re
import shutil
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import optuna
from matplotlib.figure import Figure
from omegaconf import DictConfig
from optuna.trial import TrialState

from kmnist_sweep.data.datasets import load_dataset
from kmnist_sweep.results import pareto
from kmnist_sweep.results.batchsize import SizeAnswer, answer_text, size_answer, size_table
from kmnist_sweep.results.batchsize_plot import plot_sizes
from kmnist_sweep.results.confusion import (
    CONFUSION_CSV,
    SkipPlot,
    confusion_matrix,
    figure_text,
    find_cjk_font,
    plot_confusion,
    plot_misclassified,
    write_confusion_csv,
)
from kmnist_sweep.results.tracking import Tracker
from kmnist_sweep.train.metrics import balanced_accuracy

log = logging.getLogger(__name__)

DPI = 110  # dots per inch of every PNG
VALID_PREDICTIONS = "val_preds.npz"  # per trial, under sweeps/<study>/trials/<number>/


# ---------------------------------------------------------------- the report


@dataclass
class Section:
    title: str
    image: str = ""  # file name inside report/, "" when skipped
    note: str = ""  # why it was skipped, or what to read from it
    table: list[list[str]] = field(default_factory=list)  # header row first; shown under it


@dataclass
class Report:
    directory: Path
    sections: list[Section] = field(default_factory=list)

    def add(
        self, title: str, name: str, draw: Callable[[], Figure], note: str = ""
    ) -> Section | None:
        """Draw a figure into `name`.png (its words as PNG text); a failure is a note."""
        try:
            figure = draw()
        except SkipPlot as reason:
            self.sections.append(Section(title, note=str(reason)))
            return None
        except Exception as err:  # a plot must never lose a finished sweep
            log.warning("report: %s not drawn (%s: %s)", title, type(err).__name__, err)
            self.sections.append(Section(title, note=f"not drawn: {type(err).__name__}: {err}"))
            return None
        words = {"Title": title, "Description": figure_text(figure)}
        figure.savefig(
            self.directory / f"{name}.png", dpi=DPI, bbox_inches="tight", metadata=words
        )
        _close(figure)
        section = Section(title, image=f"{name}.png", note=note)
        self.sections.append(section)
        return section


def write_report(
    study: optuna.Study,
    out_dir: Path,
    *,
    classes: Sequence[str] | None = None,
    labels: np.ndarray | None = None,
    preds: np.ndarray | None = None,
    images: np.ndarray | None = None,
    split: str = "validation",
    lr_curves: Sequence[Path] = (),
    note: str = "",
    sizes: SizeAnswer | None = None,
) -> Path:
    """Write PNGs, confusion.csv and report.html into `out_dir`/report; return the HTML path.
    `labels`, `preds` and `images` are one split's (`split`): a sweep's report shows the best
    trial's validation predictions; the test split belongs to the final model alone."""
    matplotlib.use("Agg")  # files only: never open a window, even where a display exists
    directory = Path(out_dir) / "report"
    directory.mkdir(parents=True, exist_ok=True)
    report = Report(directory)
    if (directory / "budget.png").is_file():  # a budgeted sweep's (results/budget_figure.py)
        report.sections.append(Section("Budget: trials over wall time", image="budget.png"))
    # Optuna switches pyplot to its "ggplot" style; rc_context puts the caller's style back.
    with warnings.catch_warnings(), matplotlib.rc_context():
        # Optuna marks its matplotlib plots experimental, and its axes warn when every trial
        # has the same value: neither is news in a report.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", "Attempting to set identical", UserWarning)
        if pareto.is_multi_objective(study):  # several objectives: the front is the answer
            add_front(report, study)
        if sizes is not None:  # a batch-size study opens with its answer
            add_size_answer(report, sizes)
        add_study_plots(report, study)
    for i, curve in enumerate(lr_curves):
        report.sections.append(copy_curve(Path(curve), directory, i))

    scores: dict[str, float] = {}
    if labels is not None and preds is not None:
        try:
            scores = add_split_plots(report, classes, labels, preds, images, split)
        except ValueError as err:  # predictions that do not fit the classes
            log.warning("report: no confusion matrix (%s)", err)
            title = f"Confusion matrix ({split})"
            report.sections.append(Section(title, note=f"not drawn: {err}"))
    page = directory / "report.html"
    chosen = sizes.pick.trial if sizes is not None and sizes.pick else None  # shown as best
    page.write_text(render_html(study, report, scores, note, chosen), encoding="utf-8")
    return page


def add_size_answer(report: Report, answer: SizeAnswer) -> None:
    section = report.add(
        "Batch size: accuracy and speed",
        "batch_size",
        lambda: plot_sizes(answer),
        note=answer_text(answer),
    )
    if section is not None:
        section.table = size_table(answer)


def add_front(report: Report, study: optuna.Study) -> None:
    section = report.add("Pareto front", "pareto_front", lambda: pareto.plot_front(study))
    if section is not None:
        section.table = pareto.front_table(study)


# ---------------------------------------------------------------- Optuna's plots


def add_study_plots(report: Report, study: optuna.Study) -> None:
    from optuna.visualization import matplotlib as ovm

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    params = sorted({name for t in complete for name in t.params})
    finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    # e.g. val/acc; several objectives: the plots of one show the first, as their target
    target_name = pareto.metric_names(study)[0]
    multi = pareto.is_multi_objective(study)
    first = (lambda t: t.values[0]) if multi else None
    target: dict[str, Any] = {"target": first, "target_name": target_name}
    of = f" of {target_name}" if multi else ""  # which of the metrics a plot shows

    def need_complete() -> None:
        if not complete:
            raise SkipPlot("skipped: no complete trial yet")

    def history() -> Figure:
        need_complete()
        return _figure(ovm.plot_optimization_history(study, **target))

    def importances() -> Figure:
        if len(complete) < 2 or len(params) < 2:
            raise SkipPlot(
                f"skipped: needs at least 2 complete trials and 2 parameters "
                f"(have {len(complete)} and {len(params)})"
            )
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)  # same plot every time
        return _figure(ovm.plot_param_importances(study, evaluator=evaluator, **target))

    def parallel() -> Figure:
        need_complete()
        if not params:
            raise SkipPlot("skipped: the trials have no parameters")
        return _figure(ovm.plot_parallel_coordinate(study, **target))

    def slices() -> Figure:
        need_complete()
        if not params:
            raise SkipPlot("skipped: the trials have no parameters")
        return _figure(ovm.plot_slice(study, **target))

    def intermediate() -> Figure:
        if not any(t.intermediate_values for t in finished):
            raise SkipPlot("skipped: no trial reported per-epoch values")
        return _figure(ovm.plot_intermediate_values(study))

    report.add(f"Optimisation history{of}", "optimization_history", history)
    report.add(f"Parameter importances (fANOVA){of}", "param_importances", importances)
    report.add(f"Parallel coordinates{of}", "parallel_coordinate", parallel)
    report.add(f"Slice plots{of}", "slice", slices)
    report.add("Intermediate values (per epoch)", "intermediate_values", intermediate)


def _figure(axes: Any) -> Figure:
    """The figure behind Optuna's return value (one Axes or an array of them)."""
    first = np.asarray(axes, dtype=object).flat[0]
    figure = first.get_figure()
    assert isinstance(figure, Figure)
    return figure


def _close(figure: Figure) -> None:
    # Optuna draws through pyplot, which keeps every figure alive until closed.
    import matplotlib.pyplot as plt

    plt.close(figure)


def copy_curve(curve: Path, directory: Path, index: int) -> Section:
    """Copy (not link: the sweep folder must survive being moved) an LR-finder PNG."""
    title = f"LR finder: {curve.stem}"
    name = f"lr_finder_{index}_{re.sub(r'[^A-Za-z0-9_.-]', '_', curve.name)}"
    try:
        shutil.copyfile(curve, directory / name)
    except OSError as err:
        return Section(title, note=f"not copied: {err.strerror or err} ({curve})")
    return Section(title, image=name)


# ---------------------------------------------------------------- one split's figures


def add_split_plots(
    report: Report,
    classes: Sequence[str] | None,
    labels: np.ndarray,
    preds: np.ndarray,
    images: np.ndarray | None,
    split: str,
) -> dict[str, float]:
    """confusion.csv, the confusion matrix and the misclassified grid of one split; returns
    the accuracy and balanced accuracy (K49's metric) they imply."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    names = list(classes) if classes else [str(c) for c in range(int(labels.max()) + 1)]
    matrix = confusion_matrix(labels, preds, len(names))
    write_confusion_csv(report.directory / CONFUSION_CSV, matrix, names)
    font = find_cjk_font("".join(names) + "→")
    report.add(
        f"Confusion matrix ({split})",
        "confusion",
        lambda: plot_confusion(matrix, names, font, split),
    )
    if images is not None:
        pixels = np.asarray(images)
        report.add(
            f"Misclassified {split} images (true→predicted)",
            "misclassified",
            lambda: plot_misclassified(pixels, labels, preds, names, font, split),
        )
    return {
        f"{split} accuracy": float(np.trace(matrix) / max(matrix.sum(), 1)),
        f"{split} balanced accuracy": balanced_accuracy(np.diag(matrix), matrix.sum(axis=1)),
    }


# ---------------------------------------------------------------- HTML


def render_html(
    study: optuna.Study, report: Report, scores: dict[str, float], note: str, chosen: int | None
) -> str:
    trials = study.get_trials(deepcopy=False)
    counts = {state.name.lower(): 0 for state in TrialState}
    for t in trials:
        counts[t.state.name.lower()] += 1
    by_state = ", ".join(f"{n} {state}" for state, n in counts.items() if n)
    rows = [
        ("study", study.study_name),
        ("trials", f"{len(trials)} ({by_state})" if trials else "0"),
    ]
    try:
        best = study.trials[chosen] if chosen is not None else study.best_trial
    except (ValueError, RuntimeError):  # no complete trial yet, or several objectives
        rows.extend(pareto.front_rows(study) or [("best trial", "none")])
    else:
        shown = "recommended trial" if chosen is not None else "best trial"
        rows.append((shown, f"#{best.number}: {best.value:.6g} ({study.direction.name.lower()})"))
        rows.extend((f"best {name}", _format(value)) for name, value in best.params.items())
    # The note ("not the official protocol") goes next to every accuracy.
    rows.extend(
        (name, f"{value:.4f}" + (f" ({note})" if note else "")) for name, value in scores.items()
    )
    table = "\n".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows
    )
    figures = []
    for s in report.sections:
        body = (
            f'<img src="{html.escape(s.image)}" alt="{html.escape(s.title)}">'
            if s.image
            else f'<p class="note">{html.escape(s.note)}</p>'
        )
        if s.image and s.note:
            body += f'<p class="rule">{html.escape(s.note)}</p>'
        if s.table:
            head, *body_rows = s.table
            cells = "".join(f"<th>{html.escape(c)}</th>" for c in head)
            lines = "".join(
                "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                for row in body_rows
            )
            body += f'<table class="grid"><tr>{cells}</tr>{lines}</table>'
        figures.append(f"<figure><figcaption>{html.escape(s.title)}</figcaption>{body}</figure>")
    csv_link = f'<p><a href="{CONFUSION_CSV}">{CONFUSION_CSV}</a></p>' if scores else ""
    protocol = f'<p class="note">{html.escape(note)}</p>' if note else ""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(study.study_name)}: kmnist_sweep report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1200px; }}
table {{ border-collapse: collapse; }}
th, td {{ text-align: left; padding: 0.2em 1em 0.2em 0; }}
figure {{ margin: 2em 0; }}
figcaption {{ font-weight: bold; margin-bottom: 0.5em; }}
img {{ max-width: 100%; }}
.note {{ color: #a33; }}
.grid td, .grid th {{ border-bottom: 1px solid #ddd; text-align: right; }}
</style>
</head>
<body>
<h1>Study {html.escape(study.study_name)}</h1>
{protocol}
<table>
{table}
</table>
{csv_link}
{"".join(figures)}
</body>
</html>
"""


def _format(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------- a finished sweep


def report_sweep(study: optuna.Study, cfg: DictConfig) -> Path:
    """The report of a sweep: study plots, LR-finder curves, and the best trial's validation
    predictions (saved by the objective) against the validation images; also sent to wandb."""
    out_dir = Path(str(cfg.study.output_dir))
    dataset = load_dataset(cfg.data)
    labels = preds = images = None
    sizes = size_answer(study, str(cfg.study.metric), cfg.batch_size.get("target"))
    # A batch-size study shows its recommended size's predictions; others their best trial's.
    pick = sizes.pick if sizes is not None else None
    best = study.trials[pick.trial] if pick is not None else pareto.shown_trial(study)
    if best is not None:
        saved = out_dir / "trials" / str(best.number) / VALID_PREDICTIONS
        if saved.exists():
            with np.load(saved) as npz:
                preds, labels = npz["preds"], npz["labels"]
            images = dataset.valid.images.numpy()
    curves = sorted((out_dir / "lr_finder").glob("*.png"))
    page = write_report(
        study,
        out_dir,
        classes=dataset.classes,
        labels=labels,
        preds=preds,
        images=images,
        lr_curves=curves,
        note=dataset.note,
        sizes=sizes,
    )
    tracker = Tracker(cfg.tracking, study.study_name)
    summary: dict[str, object] = {"study": study.study_name, "n_trials": len(study.trials)}
    if best is not None:
        summary.update({"best/value": best.values[0], "best/trial": best.number, **best.params})
    summary.update(pareto.front_summary(study))
    pngs = {p.stem: p for p in sorted(page.parent.glob("*.png"))}
    tracker.log_study_summary(summary, pngs)
    tracker.close()
    return page
