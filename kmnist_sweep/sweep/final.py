"""`final`: retrain a study's chosen trial on train + valid, test it once, write a bundle.

    result = run_final(Path("sweeps/batchsize-kmnist_sample"))        # the best trial
    result = run_final(study_dir, trial=3, overrides=["trainer.device=cpu"])

The sweep picked the trial on the validation split; the final model is the same recipe fit
on the validation images too (they no longer need to be held out), and the test split is
used here, once, for the number that goes with the model. The trial's config is the
study's `config.yaml` with the trial's values set: from `best.yaml`, or for `--trial N` from
the study itself (its storage as config.yaml names it, or `--storage URL`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
import yaml
from fastai.callback.core import Callback
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState
from tqdm import tqdm

from kmnist_sweep.config.check import check_config, objectives
from kmnist_sweep.config.device import pick_device
from kmnist_sweep.config.search_space import apply_params
from kmnist_sweep.data.datasets import load_dataset
from kmnist_sweep.data.splits import join_splits
from kmnist_sweep.errors import ConfigError, UserError
from kmnist_sweep.files import check_writable_dir
from kmnist_sweep.masking import MASK, mask_url
from kmnist_sweep.results.bundle import load_model, make_bundle, write_bundle
from kmnist_sweep.results.outputs import trial_values
from kmnist_sweep.results.predict import evaluate
from kmnist_sweep.sweep.storage import open_storage, quiet_optuna_warnings
from kmnist_sweep.train import engine
from kmnist_sweep.train.views import views_text


@dataclasses.dataclass(frozen=True)
class FinalResult:
    bundle: Path
    metrics: dict[str, float]  # test/acc, test/bacc (fractions), test/images
    metric: str  # the dataset's: acc or bacc
    note: str  # the dataset's note ("" for official protocols)
    study: str
    trial: int
    seconds: float  # wall time of the fit


@dataclasses.dataclass(frozen=True)
class Chosen:
    number: int
    values: dict[str, Any]  # dotted config key -> the value the trial ran with
    value: float | None  # its validation metric (None for several objectives)
    scores: dict[str, float] = dataclasses.field(default_factory=dict)  # metric -> its value


def run_final(
    study_dir: Path,
    trial: int | None = None,
    out: Path | None = None,
    overrides: Sequence[str] = (),
    storage: str | None = None,
    echo: Callable[[str], None] = print,
) -> FinalResult:
    """Train, test and bundle the chosen trial; every check of the input comes first."""
    base = read_study_config(study_dir)
    chosen = best_trial(study_dir) if trial is None else study_trial(base, trial, storage)
    cfg = final_config(base, chosen.values, overrides)
    study = str(cfg.study.name)
    out = out or study_dir / f"model-trial{chosen.number}.zip"
    if out.is_dir():
        raise UserError(f"--out {out} is a folder: name the bundle file, e.g. {out}/model.zip")
    check_writable_dir(out.parent, f"--out {out} cannot be written")

    dataset = load_dataset(cfg.data)
    if dataset.note:
        echo(f"note: {dataset.note}")
    full = dataclasses.replace(dataset, train=join_splits(dataset.train, dataset.valid))
    epochs = int(cfg.trainer.epochs)
    echo(
        f"final: trial {chosen.number} of study {study} ({cfg.model.arch}, batch "
        f"{cfg.trainer.batch_size}, lr {float(cfg.trainer.lr):.3g}, {epochs} epochs) on "
        f"train+valid: {len(full.train)} images; test once on {len(dataset.test)} "
        f"({views_text(int(cfg.trainer.test_views))} each)"
    )
    learn = engine.build_learner(cfg, full)
    start = time.perf_counter()
    with tqdm(
        total=epochs * len(learn.dls.train), desc="final fit", unit="step", disable=None
    ) as bar:

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            line = f"epoch {epoch}/{epochs}  train/loss {metrics['train/loss']:.4g}"
            if bar.disable:
                echo(line)  # a log file gets a line per epoch instead of the bar
            else:
                bar.set_postfix_str(line)

        # Valid is inside the training data now: its per-epoch scores are not shown.
        engine.train(cfg, full, on_epoch, learn=learn, quiet=True, cbs=[_StepBar(bar)])
    seconds = time.perf_counter() - start

    assert learn.dls.train is not None
    bundle = make_bundle(
        cfg,
        classes=dataset.classes,
        image_size=dataset.image_size,
        mean=learn.dls.train.mean,
        std=learn.dls.train.std,
        views=int(cfg.trainer.test_views),
        model=learn.model,
        data_name=dataset.name,
        note=dataset.note,
        files=dataset.files,
        source={"study": study, "trial": chosen.number, **study_metrics(cfg, chosen)},
    )
    # Tested through the bundle's own path (fresh model, fp32, eval mode), the one predict
    # takes, so the number stored is the saved weights' number.
    device = pick_device(str(cfg.trainer.device))
    metrics = evaluate(load_model(bundle, out, device), bundle, dataset.test, device)
    write_bundle(out, bundle.with_metrics(metrics))
    return FinalResult(out, metrics, dataset.metric, dataset.note, study, chosen.number, seconds)


def study_metrics(cfg: DictConfig, chosen: Chosen) -> dict[str, Any]:
    """What the study optimised and the trial scored, for the bundle: one metric and its
    value, or a multi-objective study's metrics, directions and the trial's values."""
    pairs = objectives(cfg.study)
    if len(pairs) == 1:
        return {"metric": pairs[0][0], "value": chosen.value, "fit": "train+valid"}
    return {
        "metrics": [m for m, _ in pairs],
        "directions": [d for _, d in pairs],
        "values": chosen.scores,
        "fit": "train+valid",
    }


class _StepBar(Callback):
    """Advances the progress bar once per training step."""

    order = 90
    run_valid = False

    def __init__(self, bar: tqdm) -> None:
        self.bar = bar

    def after_batch(self) -> None:
        self.bar.update(1)


# ---------------------------------------------------------------- what to train


def read_study_config(study_dir: Path) -> DictConfig:
    """The composed config a sweep wrote to sweeps/<study>/config.yaml."""
    if not study_dir.is_dir():
        raise UserError(f"{study_dir}: no such study folder (a sweep writes sweeps/<study>/)")
    found = _read_yaml(study_dir / "config.yaml", "the sweep's composed config")
    if not isinstance(found, dict) or not isinstance(found.get("study"), dict):
        raise UserError(f"{study_dir / 'config.yaml'}: not a sweep's config (no study: section)")
    return OmegaConf.create(found)


def best_trial(study_dir: Path) -> Chosen:
    found = _read_yaml(study_dir / "best.yaml", "the best trial; no trial has completed yet?")
    if isinstance(found, dict) and isinstance(found.get("pareto_front"), list):
        # Several objectives have no one best trial: which trade-off to ship is the user's.
        front = [str(t.get("trial")) for t in found["pareto_front"] if isinstance(t, dict)]
        raise UserError(
            f"{study_dir / 'best.yaml'}: the Pareto front of a multi-objective study "
            f"(trials {', '.join(front)}): pick one with --trial N"
        )
    if not isinstance(found, dict) or not isinstance(found.get("trial"), int):
        raise UserError(f"{study_dir / 'best.yaml'}: no trial number in it")
    params = found.get("params") or {}
    if not isinstance(params, dict):
        raise UserError(f"{study_dir / 'best.yaml'}: params is not a mapping")
    return Chosen(found["trial"], dict(params), found.get("value"))


def study_trial(cfg: DictConfig, number: int, storage: str | None) -> Chosen:
    """Trial `number` of the study in `cfg`, read from its storage."""
    url = storage or str(cfg.study.storage)
    if MASK in url:
        raise UserError(
            f"config.yaml has the study's storage with its password masked ({url}): "
            "pass --storage URL"
        )
    sqlite_file = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else None
    if sqlite_file is not None and not Path(sqlite_file).is_file():
        # Opening would create an empty database; say where we looked instead.
        raise UserError(
            f"no study storage {sqlite_file} here: run final from the folder the sweep ran "
            "in, or pass --storage URL"
        )
    name = str(cfg.study.name)
    try:
        with quiet_optuna_warnings():
            study = optuna.load_study(study_name=name, storage=open_storage(url))
    except KeyError:
        raise UserError(f"no study {name!r} in {mask_url(url)}") from None
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    complete = sorted(n for n, t in trials.items() if t.state == TrialState.COMPLETE)
    if number not in trials:
        raise UserError(
            f"--trial {number}: study {name!r} has trials 0-{len(trials) - 1}"
            if trials
            else f"--trial {number}: study {name!r} has no trials"
        )
    chosen = trials[number]
    if chosen.state != TrialState.COMPLETE:
        raise UserError(
            f"--trial {number} of study {name!r} is {chosen.state.name.lower()}: final "
            f"retrains complete trials ({', '.join(map(str, complete)) or 'none yet'})"
        )
    if len(study.directions) > 1:
        metrics = [m for m, _ in objectives(cfg.study)]
        scores = dict(zip(metrics, chosen.values, strict=True))
        return Chosen(number, trial_values(chosen), None, scores)
    return Chosen(number, trial_values(chosen), chosen.value)


# Where the debug group's switches were before it existed; a final fit reads none of them.
OLD_DEBUG_KEYS = (("study", "objective"), ("batch_size", "inject_oom"), ("launcher", "executor"))


def final_config(base: DictConfig, values: dict[str, Any], overrides: Sequence[str]) -> DictConfig:
    """The sweep's config with the trial's values and the command line's `key=value`s set,
    checked once (the same check pass as every run)."""
    cfg = apply_params(base, values)
    cfg.search_space = {}  # one run, not a sweep
    if "test_views" not in cfg.trainer:
        cfg.trainer.test_views = 1  # a study from before the key: tested as then, one view
    if "ema" not in cfg.trainer:
        cfg.trainer.ema = 0  # a study from before the key: recorded as it ran, no average
    if "min_steps" not in cfg.batch_size:
        cfg.batch_size.min_steps = 0  # a study from before the key: its epochs as set
    for section, key in OLD_DEBUG_KEYS:  # a study from before the debug group
        if isinstance(cfg.get(section), DictConfig):
            cfg[section].pop(key, None)
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as exc:
        raise ConfigError(f"cannot parse override: {str(exc).splitlines()[0]}") from None
    for override in parsed:
        key = override.key_or_group
        if override.is_add() or override.is_delete() or "." not in key:
            raise ConfigError(
                f"final takes key=value overrides of single keys (e.g. trainer.device=cpu), "
                f"not {override.input_line}: the study's config groups stay as they were"
            )
        cfg = apply_params(cfg, {key: override.value()})
    check_config(cfg)
    return cfg


def _read_yaml(path: Path, what: str) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: missing ({what})") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: cannot be read ({first})") from None
