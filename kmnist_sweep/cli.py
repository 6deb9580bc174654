"""`python -m kmnist_sweep [command] [overrides]`: compose -> check once -> dispatch.

    python -m kmnist_sweep data=kmnist_sample              # train once
    python -m kmnist_sweep +sweep=batchsize                # a sweep
    python -m kmnist_sweep report +sweep=batchsize         # rewrite a study's report
    python -m kmnist_sweep copy-study FROM_URL TO_URL NAME # move a study to another storage
    python -m kmnist_sweep final sweeps/<study>            # retrain the best trial, test, bundle
    python -m kmnist_sweep predict MODEL.zip IMAGES...     # top-k characters of PNG/JPEG files

Every error in the user's input is one line on stderr and exit status 2; a sweep stopped
for another reason is one line and exit 1; Ctrl-C/SIGTERM exit 130/143.

A command imports the layers it runs when it runs, the one place in the package that
imports inside functions (docs/design.md): fastai and the training stack take seconds to
import, and the checks that come first (a run's or sweep's config, a study's storage and
name, every command's arguments) need none of it, so that bad input is answered without
that wait.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeVar

import hydra
import optuna
from omegaconf import DictConfig, OmegaConf

import kmnist_sweep  # noqa: F401  (torchvision compat before fastai loads)
from kmnist_sweep.config.check import check_config
from kmnist_sweep.config.compose import CONF_DIR, compose_config, preflight
from kmnist_sweep.errors import Interrupted, SweepStopped, UserError
from kmnist_sweep.masking import mask_url, scrub, scrub_text
from kmnist_sweep.sweep.storage import copy_study, open_storage

if TYPE_CHECKING:
    from kmnist_sweep.sweep.final import FinalResult

T = TypeVar("T")


def process_start() -> float:
    """When this process started (Unix time): a budget's clock (study.budget) counts the
    interpreter's start and imports too. Linux says it in /proc; elsewhere, from here."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


STARTED = min(process_start(), time.time())


def train_once(cfg: DictConfig) -> float:
    """Train one model from the composed config; print per-epoch and final test metrics."""
    from kmnist_sweep.data.datasets import load_dataset
    from kmnist_sweep.train import engine
    from kmnist_sweep.train.views import views_text

    dataset = load_dataset(cfg.data)
    if dataset.note:
        print(f"note: {dataset.note}", flush=True)
    print(
        f"training {cfg.model.arch} ({cfg.model.stem} stem) on {dataset.name}: "
        f"{len(dataset.train.labels)} train / {len(dataset.valid.labels)} valid / "
        f"{len(dataset.test.labels)} test images, {dataset.num_classes} classes",
        flush=True,
    )
    result = engine.train(cfg, dataset, test=True)
    key = dataset.metric
    views = views_text(int(cfg.trainer.test_views))
    line = (
        f"final: val/{key} {result.valid[f'val/{key}']:.4f}  "
        f"test/{key} {result.test[f'test/{key}']:.4f} ({views})  ({result.seconds:.1f} s)"
    )
    print(line + (f"  [{dataset.note}]" if dataset.note else ""), flush=True)
    return result.valid[f"val/{key}"]


def sweep(cfg: DictConfig) -> float | None:
    """Run the sweep `+sweep=NAME` composed; print its summary line."""
    from kmnist_sweep.sweep.runner import run_sweep  # checks the config before any work

    final_fit = None
    if cfg.study.get("budget") is not None:  # a budgeted sweep ends with `final`'s fit
        check_config(cfg)  # bad input first: the training stack loads with final.py
        from kmnist_sweep.sweep.final import run_final

        final_fit = run_final
    summary = run_sweep(cfg, started=STARTED, final_fit=final_fit)
    if len(summary.metrics) > 1:
        # Several objectives have no best trial: the front's trials, each with its values.
        shown = ", ".join(
            f"#{number} ({', '.join(_rounded(v) for v in values)})"
            for number, values in summary.front
        )
        best = (
            f"Pareto front of {len(summary.front)} trial(s) over "
            f"({', '.join(summary.metrics)}){': ' + shown if shown else ''}"
        )
    elif summary.batch_size is not None:  # a batch-size study: its recommended size
        best = (
            f"recommended batch size {summary.batch_size}: {cfg.study.metric} "
            f"{_rounded(summary.best_value)} (trial {summary.best_trial})"
        )
    else:
        best = (
            f"best {cfg.study.metric} {_rounded(summary.best_value)} (trial {summary.best_trial})"
        )
    print(
        f"study {summary.study_name}: {summary.complete} complete, {summary.pruned} pruned, "
        f"{summary.failed} failed of {summary.n_trials}; {best}; "
        f"see {summary.output_dir}/best.yaml and {summary.output_dir}/report/report.html",
        flush=True,
    )
    for line in summary.budget:  # a budgeted sweep: its plan, what ran, the final fit
        print(line, flush=True)
    return summary.best_value


def _rounded(value: float | None) -> str:
    return "none" if value is None else f"{value:.4f}"


def report_only(cfg: DictConfig) -> None:
    """Rewrite an existing study's report from its storage and the composed config."""
    check_config(cfg)
    storage = open_storage(str(cfg.study.storage))
    try:
        study = optuna.load_study(study_name=str(cfg.study.name), storage=storage)
    except KeyError:
        raise UserError(
            f"no study {cfg.study.name!r} in {mask_url(str(cfg.study.storage))}"
        ) from None
    from kmnist_sweep.results.report import report_sweep

    print(f"report: {report_sweep(study, cfg)}", flush=True)


def run(cfg: DictConfig) -> float | None:
    """The command for a composed config: a sweep (run_sweep checks the config) or one
    training run; the config is checked once, before any work."""
    if cfg.search_space:
        return sweep(cfg)
    check_config(cfg)
    return train_once(cfg)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _entry(cfg: DictConfig) -> float | None:
    def work() -> float | None:
        save_snapshot(cfg)
        return run(cfg)

    return guarded(work)


def fail(line: str, status: int) -> NoReturn:
    print(f"kmnist_sweep: {line}", file=sys.stderr, flush=True)
    sys.exit(status)


def save_snapshot(cfg: DictConfig) -> None:
    """The run folder's config.yaml and overrides.yaml, secrets masked. Hydra's own .hydra/
    copies are switched off (hydra.output_subdir: null): they hold storage passwords."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    overrides = [scrub_text(o) for o in HydraConfig.get().overrides.task]
    try:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(scrub(cfg))))
        (run_dir / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(overrides)))
    except OSError as exc:
        raise UserError(f"cannot write the run's config to {run_dir}: {exc}") from None


def copy_study_cli(args: list[str]) -> None:
    """`python -m kmnist_sweep copy-study FROM_URL TO_URL NAME`: move a study to another
    storage (SQLite -> PostgreSQL), then run the sweep with study.storage=TO_URL."""
    parser = argparse.ArgumentParser(prog="python -m kmnist_sweep copy-study")
    parser.add_argument("from_url", help="storage holding the study, e.g. sqlite:///storage/x.db")
    parser.add_argument("to_url", help="storage to copy it to, e.g. postgresql://user@host/db")
    parser.add_argument("name", help="study name (study.name of the sweep)")
    ns = parser.parse_args(args)
    count = guarded(lambda: copy_study(ns.name, ns.from_url, ns.to_url))
    print(f"copied study {ns.name!r}: {count} trials to {mask_url(ns.to_url)}", flush=True)


class _Parser(argparse.ArgumentParser):
    """Usage errors as our one line and exit status 2, like every other bad input."""

    def error(self, message: str) -> NoReturn:
        fail(f"error: {message} (see {self.prog} --help)", 2)


def final_cli(args: list[str]) -> None:
    """`python -m kmnist_sweep final sweeps/<study> [--trial N] [--out FILE] [key=value ...]`"""
    parser = _Parser(
        prog="python -m kmnist_sweep final",
        description="Retrain a study's best trial (or --trial N) on train+valid, evaluate the "
        "test split once, and write a model bundle (weights, class map, config, data md5s, "
        "versions, test metrics) for predict.",
    )
    parser.add_argument("study_dir", type=Path, help="the sweep's folder, e.g. sweeps/lr-kmnist")
    parser.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. trainer.device=cpu"
    )
    parser.add_argument("--trial", type=int, help="trial number (default: best.yaml's trial)")
    parser.add_argument(
        "--out", type=Path, help="bundle file (default: <study_dir>/model-trialN.zip)"
    )
    parser.add_argument("--storage", help="the study's storage URL, if not config.yaml's")
    ns = parser.parse_intermixed_args(args)  # overrides may follow --trial N

    def fit() -> FinalResult:  # guarded from its import on: Ctrl-C there is exit 130 too
        from kmnist_sweep.sweep.final import run_final

        return run_final(ns.study_dir, ns.trial, ns.out, ns.overrides, ns.storage)

    result = guarded(fit)
    key = f"test/{result.metric}"
    line = (
        f"final: {key} {result.metrics[key]:.4f} on {int(result.metrics['test/images'])} "
        f"test images (trial {result.trial} of {result.study}, fit {result.seconds:.1f} s)"
    )
    print(line + (f"  [{result.note}]" if result.note else ""), flush=True)
    print(f"bundle: {result.bundle}", flush=True)


def predict_cli(args: list[str]) -> None:
    """`python -m kmnist_sweep predict MODEL.zip IMAGE_OR_FOLDER ... [--top-k K] [--csv FILE]`"""
    parser = _Parser(
        prog="python -m kmnist_sweep predict",
        description="Classify PNG/JPEG images (any size; dark-on-light ones are inverted) with "
        "a bundle written by final; prints the top-k characters of each image.",
    )
    parser.add_argument("bundle", type=Path, help="model bundle (.zip) written by final")
    parser.add_argument("images", type=Path, nargs="+", help="image files or folders of them")
    parser.add_argument("--top-k", type=int, default=3, help="characters per image (default 3)")
    parser.add_argument("--csv", type=Path, help="also write image,rank,class,character,... here")
    ns = parser.parse_intermixed_args(args)  # images may follow --top-k K

    def classify() -> list[str]:  # guarded from its import on: Ctrl-C there is exit 130 too
        from kmnist_sweep.results import predict

        preds = predict.run_predict(ns.bundle, ns.images, ns.top_k, ns.csv)
        for pred in preds:
            if pred.blank:
                print(f"kmnist_sweep: warning: {pred.path}: {predict.BLANK}", file=sys.stderr)
        return [predict.format_line(pred) for pred in preds]

    for line in guarded(classify):
        print(line)
    sys.stdout.flush()


def guarded(work: Callable[[], T]) -> T:
    """`work()`, every command's one mapping from how it ended badly to a line and a status."""
    try:
        return work()
    except UserError as exc:
        # Bad input is the user's to fix: one line, no traceback, exit status 2.
        fail(f"error: {exc}", 2)
    except SweepStopped as exc:
        # Not the user's input, and nothing lost: one line, exit 1, the same command resumes.
        fail(f"stopped: {exc}", 1)
    except KeyboardInterrupt as exc:
        code = exc.exit_code if isinstance(exc, Interrupted) else 130  # SIGTERM: 143
        fail(f"interrupted: {exc or 'interrupted'}", code)


def report_cli(args: list[str]) -> None:
    """`python -m kmnist_sweep report +sweep=NAME [key=value ...]`"""
    parser = _Parser(
        prog="python -m kmnist_sweep report",
        description="Rewrite an existing study's report (sweeps/<study>/report/) from its "
        "storage; give the overrides the sweep was run with.",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="the sweep's overrides, e.g. +sweep=batchsize data=kmnist_sample",
    )
    ns = parser.parse_args(args)
    guarded(lambda: report_only(compose_config(ns.overrides)))


# Subcommands: the first argument names one; anything else is a run or a sweep's overrides.
COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "final": final_cli,
    "predict": predict_cli,
    "report": report_cli,
    "copy-study": copy_study_cli,
}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in COMMANDS:
        COMMANDS[sys.argv[1]](sys.argv[2:])
        return
    preflight(sys.argv[1:])
    _entry()
