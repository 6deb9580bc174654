"""`python -m kmnist_sweep [overrides]`: compose the config, then train once or run a sweep."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

import kmnist_sweep  # noqa: F401  (torchvision compat before fastai loads)
from kmnist_sweep.checks import check_writable_dir
from kmnist_sweep.errors import Interrupted, SweepStopped, UserError

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def train_once(cfg: DictConfig) -> float:
    """Train one model from the composed config; print per-epoch and final test metrics."""
    from kmnist_sweep import engine
    from kmnist_sweep.data import load_dataset

    engine.check_config(cfg)
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
    line = (
        f"final: val/{key} {result.valid[f'val/{key}']:.4f}  "
        f"test/{key} {result.test[f'test/{key}']:.4f}  ({result.seconds:.1f} s)"
    )
    print(line + (f"  [{dataset.note}]" if dataset.note else ""), flush=True)
    return result.valid[f"val/{key}"]


def report_only(cfg: DictConfig) -> None:
    """`python -m kmnist_sweep report +sweep=NAME ...`: rewrite an existing study's report."""
    import optuna

    from kmnist_sweep.report import report_sweep
    from kmnist_sweep.storage import mask_url, open_storage

    storage = open_storage(str(cfg.study.storage))
    try:
        study = optuna.load_study(study_name=str(cfg.study.name), storage=storage)
    except KeyError:
        raise UserError(
            f"no study {cfg.study.name!r} in {mask_url(str(cfg.study.storage))}"
        ) from None
    print(f"report: {report_sweep(study, cfg)}", flush=True)


def run(cfg: DictConfig) -> float | None:
    if MODE == "report":
        report_only(cfg)
        return None
    if cfg.search_space:
        from kmnist_sweep.runner import run_sweep

        summary = run_sweep(cfg)
        print(
            f"study {summary.study_name}: {summary.complete} complete, {summary.pruned} pruned, "
            f"{summary.failed} failed of {summary.n_trials}; best {cfg.study.metric} "
            f"{summary.best_value} (trial {summary.best_trial}); "
            f"see {summary.output_dir}/best.yaml and {summary.output_dir}/report/report.html",
            flush=True,
        )
        return summary.best_value
    return train_once(cfg)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _entry(cfg: DictConfig) -> float | None:
    try:
        save_snapshot(cfg)
        return run(cfg)
    except UserError as exc:
        # Bad input is the user's to fix: one line, no traceback, exit status 2.
        print(f"kmnist_sweep: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    except SweepStopped as exc:
        # Not the user's input, and nothing lost: one line, exit 1, the same command resumes.
        print(f"kmnist_sweep: stopped: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt as exc:
        detail = str(exc) or "interrupted"
        print(f"kmnist_sweep: interrupted: {detail}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code if isinstance(exc, Interrupted) else 130)


def save_snapshot(cfg: DictConfig) -> None:
    """The run folder's config.yaml and overrides.yaml, secrets masked. Hydra's own .hydra/
    copies are switched off (hydra.output_subdir: null): they hold storage passwords."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from kmnist_sweep.tracking import scrub, scrub_text

    if not HydraConfig.initialized():
        return
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    overrides = [scrub_text(o) for o in HydraConfig.get().overrides.task]
    try:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(scrub(cfg))))
        (run_dir / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(overrides)))
    except OSError as exc:
        raise UserError(f"cannot write the run's config to {run_dir}: {exc}") from None


MODE = "run"  # "report" when the first argument is the word report


def preflight(args: list[str]) -> None:
    """Compose the config once before Hydra does, so that an unknown group, option or key is
    one line and exit status 2 rather than Hydra's multi-line report and status 1."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if any(a.startswith("-") for a in args):
        return  # --help, --cfg, -m ...: Hydra's own business
    overrides = [a for a in args if not a.lstrip("+~").startswith("hydra.")]
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
        # Hydra makes its run folder before our code runs; a read-only disk would be its
        # traceback, not our line.
        run_dir = str(cfg.hydra.run.dir)
        check_writable_dir(Path(run_dir), f"hydra.run.dir={run_dir!r} cannot be created")
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        print(f"kmnist_sweep: error: {one_line(exc, overrides)}", file=sys.stderr, flush=True)
        sys.exit(2)
    except UserError as exc:
        print(f"kmnist_sweep: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)


def one_line(exc: BaseException, overrides: list[str]) -> str:
    """Hydra's composition error as one line: the problem, and the options where it lists them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if "Config search path:" in lines:
        lines = lines[: lines.index("Config search path:")]
    text: list[str] = []
    options: list[str] = []
    for line in lines:
        if line.startswith("Available options in"):
            if text:
                text[-1] += ";"
            text.append(line.rstrip(":").replace("Available options", "available options") + ":")
        elif text and text[-1].endswith(":") and "available options" in text[-1]:
            options.append(line)
        else:
            text.append(line)
    message = " ".join(text) + (" " + ", ".join(options) if options else "")
    if isinstance(exc, OverrideParseException):
        parser = OverridesParser.create()
        for override in overrides:
            try:
                parser.parse_overrides([override])
            except OverrideParseException:
                return f"cannot parse override {override!r}: {lines[0]}"
    return message


def copy_study_cli(args: list[str]) -> None:
    """`python -m kmnist_sweep copy-study FROM_URL TO_URL NAME`: move a study to another
    storage (SQLite -> PostgreSQL), then run the sweep with study.storage=TO_URL."""
    import argparse

    from kmnist_sweep.storage import copy_study, mask_url

    parser = argparse.ArgumentParser(prog="python -m kmnist_sweep copy-study")
    parser.add_argument("from_url", help="storage holding the study, e.g. sqlite:///storage/x.db")
    parser.add_argument("to_url", help="storage to copy it to, e.g. postgresql://user@host/db")
    parser.add_argument("name", help="study name (study.name of the sweep)")
    ns = parser.parse_args(args)
    try:
        count = copy_study(ns.name, ns.from_url, ns.to_url)
    except UserError as exc:
        print(f"kmnist_sweep: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(f"copied study {ns.name!r}: {count} trials to {mask_url(ns.to_url)}", flush=True)


def main() -> None:
    global MODE
    if len(sys.argv) > 1 and sys.argv[1] == "copy-study":
        copy_study_cli(sys.argv[2:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "report":
        MODE = "report"
        del sys.argv[1]
    preflight(sys.argv[1:])
    _entry()


if __name__ == "__main__":
    main()
