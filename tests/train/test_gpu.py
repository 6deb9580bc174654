"""The CUDA path.

CPU tests pin what a GPU run depends on: which device a worker pinned to one GPU asks for,
and bf16 autocast only where the GPU has bf16 in hardware. Tests marked `gpu` run the real
thing and skip without CUDA (tests/conftest.py): training in bf16 and channels-last through
the engine and the command line, a real CUDA out-of-memory that halves the batch and frees
the failed attempt, sweeps whose two workers share one GPU, and `final` then `predict` on
CUDA.
`bash benchmarks/gpu_check.sh` runs them on a GPU machine, with benchmark part 3.
"""

from __future__ import annotations

import csv
import datetime
import gc
import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from fastai.callback.core import Callback
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState
from PIL import Image

from kmnist_sweep.config import device as device_rules
from kmnist_sweep.config.device import use_bf16
from kmnist_sweep.config.search_space import apply_params
from kmnist_sweep.data.datasets import load_dataset
from kmnist_sweep.errors import ConfigError
from kmnist_sweep.results.bundle import load_model, read_bundle
from kmnist_sweep.results.predict import probabilities
from kmnist_sweep.sweep.local import worker_payload
from kmnist_sweep.sweep.objective import make_objective
from kmnist_sweep.sweep.runner import run_sweep
from kmnist_sweep.sweep.worker_spec import WorkerSpec, from_payload
from kmnist_sweep.train import batch_size, engine
from tests.conftest import run_cli
from tests.sweep import test_runner
from tests.sweep.test_runner import load

toy_cfg = test_runner.toy_cfg  # the fixture: a toy-objective config under tmp_path
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
GIB = 2**30


# --------------------------------------------------------------------------- on any machine


def test_a_pinned_worker_asks_for_the_one_gpu_it_sees(
    toy_cfg: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This process sees two GPUs, host GPUs 3 and 5: `cuda:1` is host GPU 5. Its workers are
    pinned to it with CUDA_VISIBLE_DEVICES=5, where it is cuda:0, so they must ask for `cuda`;
    `cuda:1` would name a GPU they cannot see."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # this process only
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cfg = toy_cfg(
        "+sweep=lr",
        "study.n_trials=4",
        "study.workers=2",
        "trainer.device=cuda:1",
        "trainer.precision=fp32",
        toy={"record_device": True},
    )
    summary = run_sweep(cfg)
    finished = [t for t in load(cfg).get_trials(deepcopy=False) if t.state in FINISHED]
    assert summary.complete + summary.pruned == 4 == len(finished)
    assert {t.user_attrs["cuda_visible_devices"] for t in finished} == {"5"}
    assert {t.user_attrs["device"] for t in finished} == {"cuda"}


def test_only_pinned_workers_get_their_device_renamed() -> None:
    cfg = {"trainer": {"device": "cuda:1", "lr": 0.1}, "seed": 0}
    since = datetime.datetime(2026, 1, 2, 3, 4, 5)
    spec = WorkerSpec(cfg, "m:f", 4, since, None, None, 1.0, Path("s/.lock"), None, 5.0)
    pinned = worker_payload(spec, 1, "5")
    assert pinned["cfg"] == {"trainer": {"device": "cuda", "lr": 0.1}, "seed": 0}
    assert from_payload(pinned)[1] == 1
    assert from_payload(pinned)[0] == replace(spec, cfg=pinned["cfg"])  # the rest as is
    assert spec.cfg["trainer"]["device"] == "cuda:1"  # the other workers' stays as is
    assert worker_payload(spec, 0, None)["cfg"]["trainer"]["device"] == "cuda:1"
    for kept in ("auto", "cuda", "cpu"):
        same = replace(spec, cfg={"trainer": {"device": kept}})
        assert worker_payload(same, 0, "0")["cfg"]["trainer"]["device"] == kept


def test_bf16_only_where_the_gpu_has_it_in_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda")
    # A Turing GPU: PyTorch emulates bf16 there (is_bf16_supported() says True), slowly.
    monkeypatch.setattr(
        torch.cuda, "is_bf16_supported", lambda including_emulation=True: bool(including_emulation)
    )
    assert use_bf16("auto", cuda) is False
    with pytest.raises(ConfigError, match="trainer.precision=bf16 needs"):
        use_bf16("bf16", cuda)
    # Ampere and later.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert use_bf16("auto", cuda) is True and use_bf16("fp32", cuda) is False


def test_an_error_inside_a_bf16_step_leaves_autocast_off(
    compose_cfg: Callable[..., DictConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CUDA out-of-memory inside the forward skips the step's after_loss, where Autocast
    leaves its context: it must not stay on for the halved retry and the rest of the process
    (nor keep its cache of the failed model's bf16 weights). CPU autocast shows it too."""
    monkeypatch.setattr(device_rules, "cpu_has_bf16", lambda: True)  # emulated: slow, works
    cfg = compose_cfg(
        "data=synthetic",
        "data.n_train=256",
        "trainer.epochs=1",
        "trainer.device=cpu",
        "trainer.precision=bf16",
    )
    data = load_dataset(cfg.data)
    learn = engine.build_learner(cfg, data, batch_size=64)

    def no_room(module: torch.nn.Module, args: Any) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory (raised by the test)")

    learn.model.layer2.register_forward_pre_hook(no_room)  # mid-forward, under autocast
    try:
        with pytest.raises(torch.OutOfMemoryError):
            engine.train(cfg, data, learn=learn, quiet=True)
        assert not torch.is_autocast_enabled("cpu")
    finally:
        torch.set_autocast_enabled("cpu", False)  # for the next tests, should this one fail


# --------------------------------------------------------------------------- on a GPU


class Probe(Callback):
    """What the training steps really ran on: the device of the inputs, the memory layout of
    layer1's output (a one-channel input is the same in both layouts), the output dtype."""

    order = 5  # after_pred before Autocast's (10), which casts the output back to fp32

    def __init__(self) -> None:
        self.devices: set[str] = set()
        self.channels_last: set[bool] = set()
        self.pred_dtypes: set[torch.dtype] = set()

    def before_fit(self) -> None:
        self.hook = self.learn.model.layer1.register_forward_hook(self.layout)

    def layout(self, module: torch.nn.Module, args: Any, out: torch.Tensor) -> None:
        if module.training:
            self.channels_last.add(out.is_contiguous(memory_format=torch.channels_last))

    def before_batch(self) -> None:
        if self.training:
            self.devices.add(self.learn.xb[0].device.type)

    def after_pred(self) -> None:
        if self.training:
            self.pred_dtypes.add(self.learn.pred.dtype)

    def after_fit(self) -> None:
        self.hook.remove()


def train_probed(
    compose_cfg: Callable[..., DictConfig], device: str, precision: str, channels_last: bool
) -> tuple[engine.TrainResult, Probe]:
    cfg = compose_cfg(
        "data=synthetic",
        "trainer.epochs=3",
        "trainer.batch_size=64",
        f"trainer.device={device}",
        f"trainer.precision={precision}",
        f"trainer.channels_last={str(channels_last).lower()}",
    )
    probe = Probe()
    return engine.train(cfg, load_dataset(cfg.data), quiet=True, cbs=[probe]), probe


@pytest.mark.gpu
@pytest.mark.parametrize(("precision", "channels_last"), [("bf16", True), ("fp32", False)])
def test_engine_trains_on_cuda_as_configured(
    compose_cfg: Callable[..., DictConfig], precision: str, channels_last: bool
) -> None:
    result, probe = train_probed(compose_cfg, "cuda", precision, channels_last)
    assert probe.devices == {"cuda"} and probe.channels_last == {channels_last}
    assert probe.pred_dtypes == {torch.bfloat16 if precision == "bf16" else torch.float32}
    assert result.learner is not None
    weight = result.learner.model.layer1[0].conv1.weight  # 64 channels: layouts differ
    assert weight.is_cuda
    assert weight.is_contiguous(memory_format=torch.channels_last) is channels_last
    losses = [h["train/loss"] for h in result.history]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    assert result.valid["val/acc"] > 0.5, result.valid  # 10 classes: chance is 0.1


@pytest.mark.gpu
def test_auto_precision_is_bf16_from_ampere_on() -> None:
    native = torch.cuda.get_device_capability() >= (8, 0)
    assert use_bf16("auto", torch.device("cuda")) is native


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, cwd=cwd, timeout=300)


@pytest.mark.gpu
def test_cli_trains_on_cuda_in_bf16_channels_last(tmp_path: Path) -> None:
    out = cli(
        "data=synthetic",
        "trainer.epochs=2",
        "trainer.device=cuda:0",
        "trainer.precision=bf16",
        "trainer.channels_last=true",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"^epoch 2/2 .*val/acc", out.stdout, re.M), out.stdout
    assert re.search(r"^final: val/acc [\d.]+  test/acc [\d.]+", out.stdout, re.M), out.stdout


class MemoryAtFit(Callback):
    """torch.cuda.memory_allocated() as an attempt's fit starts, before its first step."""

    def __init__(self, levels: list[int]) -> None:
        self.levels = levels  # ints only: this callback must not keep any tensor alive

    def before_fit(self) -> None:
        self.levels.append(torch.cuda.memory_allocated())


@pytest.mark.gpu
def test_real_cuda_oom_halves_the_batch_and_frees_the_failed_attempt(
    compose_cfg: Callable[..., DictConfig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = compose_cfg(
        "data=synthetic",
        "data.n_train=9000",
        "model.stem=small",  # keeps 28x28 through layer1: ~2-3 MB of bf16 activations/image
        "trainer.device=cuda",
        "trainer.precision=auto",  # bf16 from Ampere on: autocast must not outlive an OOM
        "trainer.epochs=1",
        "trainer.eval_batch_size=256",
        "tracking=disabled",
        f"study.output_dir={tmp_path}",
        "+search_space={trainer.batch_size: {type: pow2, low: 4096, high: 4096}}",
    )
    data = load_dataset(cfg.data)
    # A small run first: cuBLAS keeps its workspace for the life of the process, and it must
    # not count as memory the first attempt left behind.
    warm = engine.train(apply_params(cfg, {"trainer.batch_size": 64}), data, quiet=True)
    del warm
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()

    before_build: list[int] = []  # as each attempt starts: nothing of an earlier one left
    at_fit: list[int] = []  # before each attempt's first step: its own model and data only
    build = engine.build_learner

    def counted_build(*args: Any, **kwargs: Any) -> Any:
        before_build.append(torch.cuda.memory_allocated())
        return build(*args, **kwargs)

    monkeypatch.setattr(engine, "build_learner", counted_build)
    guards = batch_size.guards
    monkeypatch.setattr(batch_size, "guards", lambda c: [*guards(c), MemoryAtFit(at_fit)])
    # 2 GiB over what is held now: a few hundred images fit, 4096 (~10 GB) do not.
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + 2 * GIB) / total)
    try:
        study = optuna.create_study(direction="maximize")
        study.optimize(make_objective(cfg), n_trials=1)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    trial = study.trials[0]
    attrs = trial.user_attrs
    assert trial.state == TrialState.COMPLETE, attrs
    halvings = attrs["batch_size/halvings"]
    assert halvings and all(h["cause"] == "oom" for h in halvings), halvings
    assert not any("injected" in h["detail"] for h in halvings), halvings  # a real one
    assert 16 <= attrs["batch_size/effective"] < 4096, attrs
    attempts = len(halvings) + 1
    assert len(before_build) == attempts == len(at_fit), (before_build, at_fit)
    assert before_build == [base] * attempts, (base, before_build)
    assert at_fit == [at_fit[0]] * attempts, at_fit


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize(
    "workers",
    [("study.workers_per_gpu=2",), ("study.workers=2", "trainer.device=cuda:0")],
    ids=["workers_per_gpu=2", "cuda:0 x2"],
)
def test_two_workers_on_one_gpu_finish_a_study(tmp_path: Path, workers: tuple[str, ...]) -> None:
    out = cli(
        "+sweep=batchsize",
        "data=synthetic",
        "data.n_train=2048",
        "trainer.epochs=2",
        "batch_size.min_steps=0",
        "study.n_trials=6",
        "++search_space.trainer.batch_size.low=32",
        "++search_space.trainer.batch_size.high=1024",
        "tracking=disabled",
        "debug.objective=tests.cuda_objective:make_recording_objective",
        *workers,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    url = f"sqlite:///{tmp_path}/storage/batchsize-synthetic.db"
    study = optuna.load_study(study_name="batchsize-synthetic", storage=url)
    finished = [t for t in study.get_trials(deepcopy=False) if t.state in FINISHED]
    assert len(finished) == 6, [(t.number, t.state, t.user_attrs) for t in study.trials]
    # Both pinned to this process's first GPU, as CUDA_VISIBLE_DEVICES spells it.
    first_gpu = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0].strip()
    assert {t.user_attrs["cuda_visible_devices"] for t in finished} == {first_gpu}
    asked = "cuda" if "trainer.device=cuda:0" in workers else "auto"
    assert {t.user_attrs["device"] for t in finished} == {asked}
    assert all(t.user_attrs["cuda_peak_bytes"] > 0 for t in finished)  # trained on the GPU
    assert {t.user_attrs["worker"] for t in finished} == {"0", "1"}  # both ran trials
    logs = sorted((tmp_path / "sweeps" / "batchsize-synthetic" / "logs").glob("worker-*.log"))
    assert len(logs) == 2
    for log in logs:
        assert "Traceback" not in log.read_text(), log


@pytest.mark.gpu
def test_final_and_predict_run_on_cuda_and_agree_with_the_cpu(tmp_path: Path) -> None:
    """A one-trial study, `final` trained on CUDA, then `predict` (which picks CUDA itself)
    on the held-out images as PNG files: its top-1 answers are the bundle's model's on the
    CPU, image for image, and as many are right as `final` stored."""
    sweep = cli(
        "+sweep=batchsize",
        "data=synthetic",
        "data.n_train=2048",
        "trainer.epochs=0",
        "study.n_trials=1",
        "++search_space.trainer.batch_size.low=64",
        "++search_space.trainer.batch_size.high=64",
        "tracking=disabled",
        "trainer.device=cuda",
        cwd=tmp_path,
    )
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    study_dir = tmp_path / "sweeps" / "batchsize-synthetic"
    final = cli("final", str(study_dir), "trainer.epochs=3", "trainer.device=cuda", cwd=tmp_path)
    assert final.returncode == 0, final.stderr[-3000:]
    bundle_path = study_dir / "model-trial0.zip"
    bundle = read_bundle(bundle_path)
    assert bundle.config["trainer"]["device"] == "cuda"

    test = load_dataset(OmegaConf.create(bundle.config).data).test
    folder = tmp_path / "held-out"
    folder.mkdir()
    for i, image in enumerate(test.images.numpy()):
        Image.fromarray(image).save(folder / f"{i:05d}.png")
    out = cli("predict", str(bundle_path), str(folder), "--top-k", "1", "--csv", "p.csv",
              cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    with (tmp_path / "p.csv").open(encoding="utf-8") as fh:
        on_cuda = [int(row["class"]) for row in csv.DictReader(fh)]
    model = load_model(bundle, bundle_path, torch.device("cpu"))
    on_cpu = probabilities(model, bundle, test.images, torch.device("cpu")).argmax(-1).tolist()
    agree = sum(a == b for a, b in zip(on_cuda, on_cpu, strict=True))
    assert agree >= len(on_cpu) - 1, (agree, len(on_cpu))  # fp32 both: a tie may flip one
    right = sum(p == t for p, t in zip(on_cuda, test.labels.tolist(), strict=True))
    assert abs(right - bundle.metrics["test/acc"] * len(on_cpu)) <= 1
