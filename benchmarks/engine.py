"""Engine benchmark, run by hand: `python benchmarks/engine.py [--part 1 2 4 5]`.

1. images/s of the tool's fastai training step vs a bare PyTorch loop (same model, batch,
   precision, device, same device-resident batches), measured in one process, interleaved.
2. The seed article's recipe (fastai DataBlock pipeline, vision_learner(resnet34), bs 128,
   lr_find minimum/10, 10 epochs one-cycle) vs the tool's default recipe on kmnist_sample:
   wall time to reach the seed's final held-out accuracy, and both final accuracies.
3. CUDA: benchmarks/gpu.py (throughput grid, 60k-image epoch, engine vs bare loop, packed
   trials, torch.compile); `bash benchmarks/gpu_check.sh` runs it with the gpu tests. It
   needs a GPU, so it runs only when named (`--part 3`).
4. One optimiser step over resnet18's parameters: torch's default (foreach) against the
   fused kernels the engine uses, SGD and AdamW, interleaved, median.
5. The bare model's training throughput per batch size and layout (fp32 NCHW, fp32
   channels-last, bf16 autocast channels-last where the CPU has native bf16): the ceiling
   on how fast any recipe with resnet18 can run an epoch on this machine.
Prints markdown tables; paste them into docs/benchmarks.md with the machine.
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from unittest import mock

import gpu
import numpy as np
import torch
from fastai.callback.core import Callback
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kmnist_sweep.data.datasets import Dataset, Split, load_dataset  # noqa: E402
from kmnist_sweep.train import engine  # noqa: E402
from kmnist_sweep.train.ema import UPDATE_EVERY, WeightAverage  # noqa: E402


def compose_cfg(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def machine() -> str:
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"{dev}, torch {torch.__version__}"
    )


# ------------------------------------------------------------------ part 1: step throughput


def bare_epoch(learn: engine.Learner, lr: float, bf16: bool) -> float:
    """One epoch of a plain PyTorch loop over the learner's own loader, in the same precision
    as the tool's step (bf16 autocast around forward and loss, or fp32); returns seconds."""
    model, loader = learn.model, learn.dls.train
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05, fused=True)
    loss_fn = learn.loss_func
    device_type = next(model.parameters()).device.type
    model.train()
    start = time.perf_counter()
    for x, y in loader:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            pred = model(x)
        loss = loss_fn(pred.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


class _TrainClock(Callback):
    """Seconds of the training phase alone: the bare loop has no validation to time."""

    # First at both ends (fastai runs after_train in the same order as before_train): the
    # clock includes the other callbacks' before_train work, not their after_train work.
    order = -100

    def before_train(self) -> None:
        self.start = time.perf_counter()

    def after_train(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start


def tool_epoch(learn: engine.Learner, lr: float, ema: float) -> float:
    """One epoch of the tool's fastai step (one-cycle, recorder, its callbacks, the weight
    average `engine.train` adds when trainer.ema > 0); seconds of the training phase
    (validation and fit's set-up are off the clock, as in the bare loop)."""
    clock = _TrainClock()
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(1, lr_max=lr, cbs=[clock, *([WeightAverage(ema)] if ema else [])])
    return clock.seconds


def page_faults() -> int:
    """Minor page faults of this process so far: memory the C allocator handed back to the
    OS and got again is one fault per 4 KiB page (train/memory.py)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def part1(repeats: int, precisions: list[str], malloc_default: bool) -> None:
    """Per precision: the tool's learner (its own Autocast callback when bf16) against the
    bare loop with the same autocast, same model, same device-resident batches."""
    print("\n### 1. Training step throughput (resnet18, imagenet stem, bs 128, channels-last)\n")
    print(
        "| precision | bare PyTorch images/s | kmnist_sweep images/s | ratio tool/bare "
        "| kmnist_sweep, trainer.ema=0 | ratio | page faults per step: bare / tool / ema=0 |"
    )
    print("|---|---|---|---|---|---|---|")
    for precision in precisions:
        cfg = compose_cfg(
            "data=synthetic",
            "data.n_train=6400",
            "data.n_test=64",
            "trainer.batch_size=128",
            f"trainer.precision={precision}",
            # The bare loop's optimiser, whatever the defaults are: AdamW, decay 0.05.
            "trainer.optimizer=adamw",
            "trainer.weight_decay=0.05",
        )
        data = load_dataset(cfg.data)
        tiny_valid = Split(data.valid.images[:128], data.valid.labels[:128])
        data = Dataset(data.name, data.classes, data.train, tiny_valid, data.test, data.metric, "")
        if malloc_default:  # glibc's own thresholds, as before build_learner fixed them
            with mock.patch.object(engine.memory, "keep_freed_host_memory", return_value=False):
                learn = engine.build_learner(cfg, data)
        else:
            learn = engine.build_learner(cfg, data)
        bf16 = any(isinstance(cb, engine.Autocast) for cb in learn.cbs)
        if bf16 != (precision == "bf16"):
            raise SystemExit(f"trainer.precision={precision} did not give bf16={bf16}")
        n = data.train.labels.numel()
        steps = len(learn.dls.train)
        bare_epoch(learn, 1e-3, bf16)  # warm-up: allocator, oneDNN kernels
        loops: dict[str, Callable[[], float]] = {
            "bare": partial(bare_epoch, learn, 1e-3, bf16),
            "tool": partial(tool_epoch, learn, 1e-3, float(cfg.trainer.ema)),
            "plain": partial(tool_epoch, learn, 1e-3, 0.0),
        }
        speed: dict[str, list[float]] = {name: [] for name in loops}
        faults: dict[str, list[float]] = {name: [] for name in loops}
        for _ in range(repeats):  # interleaved so drifts in machine load hit all alike
            for name, epoch in loops.items():
                before = page_faults()
                speed[name].append(n / epoch())
                faults[name].append((page_faults() - before) / steps)
        b, t, p = (statistics.median(speed[name]) for name in loops)
        f = " / ".join(f"{statistics.median(faults[name]):.0f}" for name in loops)
        print(f"| {precision} | {b:.0f} | {t:.0f} | {t / b:.3f} | {p:.0f} | {p / b:.3f} | {f} |")
    print(
        f"\nmedian of {repeats} interleaved epochs of {n} images each; the tool's step "
        f"includes the weight average (trainer.ema={cfg.trainer.ema}); page faults include "
        f"each fit's set-up; glibc's malloc thresholds "
        f"{'left at their defaults' if malloc_default else 'fixed as build_learner does'}"
    )


# ------------------------------------------------------------------ part 2: seed recipe


def heldout_dataset() -> Dataset:
    """kmnist_sample with train+valid merged for training and the 20% held-out as valid."""
    data = load_dataset(compose_cfg("data=kmnist_sample").data)
    train = Split(
        torch.cat([data.train.images, data.valid.images]),
        torch.cat([data.train.labels, data.valid.labels]),
    )
    return Dataset(data.name, data.classes, train, data.test, data.test, data.metric, data.note)


def seed_recipe(data: Dataset, epochs: int) -> tuple[list[tuple[float, float]], float]:
    from fastai.data.block import CategoryBlock, DataBlock
    from fastai.data.transforms import IndexSplitter
    from fastai.metrics import accuracy
    from fastai.vision.all import ImageBlock, PILImageBW, minimum, resnet34, vision_learner

    images = torch.cat([data.train.images, data.valid.images]).numpy()
    labels = torch.cat([data.train.labels, data.valid.labels]).numpy()
    n_train = data.train.labels.numel()
    block = DataBlock(
        blocks=(ImageBlock(cls=PILImageBW), CategoryBlock),
        get_x=lambda i: PILImageBW.create(images[i]),
        get_y=lambda i: int(labels[i]),
        splitter=IndexSplitter(list(range(n_train, len(labels)))),
    )
    start = time.perf_counter()
    dls = block.dataloaders(np.arange(len(labels)), bs=128, num_workers=0)
    learn = vision_learner(dls, resnet34, pretrained=False, n_in=1, metrics=accuracy)
    with learn.no_bar(), learn.no_logging():
        (lr,) = learn.lr_find(suggest_funcs=(minimum,), show_plot=False)
    curve: list[tuple[float, float]] = []

    class Clock(Callback):
        order = 70

        def after_epoch(self) -> None:
            curve.append((time.perf_counter() - start, float(self.learn.recorder.log[3])))

    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(epochs, lr, cbs=[Clock()])
    return curve, lr


def tool_recipe(data: Dataset, overrides: list[str]) -> list[tuple[float, float]]:
    cfg = compose_cfg("data=kmnist_sample", *overrides)
    curve: list[tuple[float, float]] = []
    start = time.perf_counter()

    def clock(epoch: int, metrics: dict[str, float]) -> None:
        curve.append((time.perf_counter() - start, metrics["val/acc"]))

    engine.train(cfg, data, clock, quiet=True)
    return curve


def time_to(curve: list[tuple[float, float]], target: float) -> float | None:
    # Accuracies come from float32 (0.968 is 0.96799999...); a --seed-result typed by hand
    # is the exact decimal. A millionth is far below one image of 2,000 (0.0005).
    return next((t for t, acc in curve if acc >= target - 1e-6), None)


def part2(
    epochs: int, overrides: list[str], seeds: list[int], seed_result: list[float] | None = None
) -> None:
    """Per seed, interleaved: the seed recipe (fastai's set_seed) and then the tool with
    `seed=` the same; the ratio is the tool's time to the seed's final accuracy over the
    seed's wall time, and the figure to quote is the median ratio over the seeds."""
    from fastai.torch_core import set_seed

    data = heldout_dataset()
    shown = " ".join(overrides) or "defaults"
    print(f"\n### 2. Seed recipe vs tool default on kmnist_sample ({data.note})\n")
    print(f"train {data.train.labels.numel()} / held-out {data.valid.labels.numel()} images\n")
    print(
        "| seed | seed recipe: lr_find minimum/10 | its final held-out acc | its wall s "
        f"| kmnist_sweep ({shown}): final acc | wall s | s to reach the seed's final acc |"
    )
    print("|---|---|---|---|---|---|---|")
    ratios: list[float] = []
    curves: list[str] = []
    for seed in seeds:
        if seed_result:  # (accuracy, seconds, lr) of an earlier seed run on this machine
            seed_curve, seed_lr = [(seed_result[1], seed_result[0])], seed_result[2]
        else:
            set_seed(seed, reproducible=True)
            seed_curve, seed_lr = seed_recipe(data, epochs)
        tool_curve = tool_recipe(data, [*overrides, f"seed={seed}"])
        (seed_s, target), reach = seed_curve[-1], time_to(tool_curve, seed_curve[-1][1])
        if reach is not None:
            ratios.append(reach / seed_s)
        reach_s = f"{reach:.1f} ({reach / seed_s:.3f} of seed)" if reach else "not reached"
        print(
            f"| {seed} | {seed_lr:.2e} | {target:.4f} | {seed_s:.1f} "
            f"| {tool_curve[-1][1]:.4f} | {tool_curve[-1][0]:.1f} | {reach_s} |"
        )
        curves.append(
            f"seed {seed}, seed recipe: {[(round(t, 1), round(a, 4)) for t, a in seed_curve]}"
        )
        curves.append(f"seed {seed}, tool: {[(round(t, 1), round(a, 4)) for t, a in tool_curve]}")
    if seed_result:
        print("\n(seed recipe figures reused from an earlier run: --seed-result)")
    reached = f"{len(ratios)} of {len(seeds)} seeds reached the seed's accuracy"
    median = f"median ratio {statistics.median(ratios):.3f}" if ratios else "no ratio"
    print(f"\n{median} ({reached}; {epochs} epochs each)\n")
    print("per-epoch held-out accuracy (s, acc):")
    print("\n".join(curves))


# ------------------------------------------------------------------ part 3: CUDA


def part3() -> None:
    gpu.main([])  # its own sizes and time budget; --tiny etc. through benchmarks/gpu.py


# ------------------------------------------------------------------ part 4: optimiser step


def part4(repeats: int) -> None:
    from torchvision import models

    params = list(models.resnet18(num_classes=10).parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    makers: dict[str, Callable[[bool], torch.optim.Optimizer]] = {
        "SGD (Nesterov 0.9, decay 5e-4)": lambda fused: torch.optim.SGD(
            params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, fused=fused
        ),
        "AdamW (decay 0.05)": lambda fused: torch.optim.AdamW(
            params, lr=1e-3, weight_decay=0.05, fused=fused
        ),
    }

    def ms_per_step(opt: torch.optim.Optimizer, steps: int = 20) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            opt.step()
        return (time.perf_counter() - start) / steps * 1000

    n = sum(p.numel() for p in params)
    print(f"\n### 4. One optimiser step over resnet18's {n / 1e6:.1f} M parameters (ms)\n")
    print("| optimiser | default (foreach) | fused | fused / default |")
    print("|---|---|---|---|")
    for name, make in makers.items():
        opts = {fused: make(fused) for fused in (False, True)}
        for opt in opts.values():
            ms_per_step(opt, 3)  # warm-up: state allocation
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(repeats):  # interleaved
            for fused, opt in opts.items():
                times[fused].append(ms_per_step(opt))
        plain, fused_ms = statistics.median(times[False]), statistics.median(times[True])
        print(f"| {name} | {plain:.1f} | {fused_ms:.1f} | {fused_ms / plain:.2f} |")
    print(f"\nmedian of {repeats} interleaved runs of 20 steps; random gradients")
    # What trainer.ema adds: one lerp of the average towards the live weights and batch-norm
    # buffers (train/ema.py), every UPDATE_EVERY steps. In training the three copies are out
    # of cache (a step's activations and gradients pass through it in between), so the
    # update is timed both right after the last one and after a 512 MB scratch write.
    state = models.resnet18(num_classes=10).state_dict().values()
    live = [t for t in state if t.is_floating_point()]
    average = [t.clone() for t in live]
    scratch = torch.empty(128 * 2**20, dtype=torch.float32)
    hot: list[float] = []
    cold: list[float] = []
    for _ in range(repeats):
        for clock in (hot, cold):
            runs = []
            for _ in range(20):
                if clock is cold:
                    scratch.fill_(1.0)
                start = time.perf_counter()
                torch._foreach_lerp_(average, live, 0.01)
                runs.append(time.perf_counter() - start)
            clock.append(statistics.median(runs) * 1000)
    hot_ms, cold_ms = statistics.median(hot), statistics.median(cold)
    print(
        f"\nweight average (trainer.ema), one update over {sum(t.numel() for t in live) / 1e6:.1f}"
        f" M floats: {hot_ms:.1f} ms in cache, {cold_ms:.1f} ms out of cache; every "
        f"{UPDATE_EVERY} steps that is {cold_ms / UPDATE_EVERY:.1f} ms per step out of cache "
        f"(median of {repeats} runs of 20)"
    )


# ------------------------------------------------------------------ part 5: step ceiling


def part5(repeats: int, batches: list[int]) -> None:
    """images/s of forward, loss, backward and a fused SGD step, nothing else: resnet18 with
    the tool's imagenet stem on random 28x28 batches, one model per setting, interleaved."""
    from kmnist_sweep.config.device import cpu_has_bf16
    from kmnist_sweep.train.model import build_model

    settings = [("fp32", "NCHW"), ("fp32", "channels-last")]
    if cpu_has_bf16():
        settings.append(("bf16", "channels-last"))
    model_cfg = compose_cfg().model
    print("\n### 5. Bare resnet18 training step, images/s (imagenet stem, 28x28, fused SGD)\n")
    print("| batch | " + " | ".join(f"{p} {f}" for p, f in settings) + " |")
    print("|---|" + "---|" * len(settings))
    for bs in batches:
        steps = max(4, 2048 // bs)
        runs = {s: _bare_steps(build_model(model_cfg, 10), bs, *s) for s in settings}
        for run in runs.values():
            run(2)  # warm-up: oneDNN picks its kernels
        rates: dict[tuple[str, str], list[float]] = {s: [] for s in settings}
        for _ in range(repeats):  # interleaved
            for s, run in runs.items():
                rates[s].append(steps * bs / run(steps))
        cells = " | ".join(f"{statistics.median(rates[s]):.0f}" for s in settings)
        print(f"| {bs} | {cells} |", flush=True)
    print(f"\nmedian of {repeats} interleaved runs of max(4, 2048 / batch) steps; {machine()}")


def _bare_steps(
    model: torch.nn.Module, bs: int, precision: str, layout: str
) -> Callable[[int], float]:
    fmt = torch.channels_last if layout == "channels-last" else torch.contiguous_format
    model = model.to(memory_format=fmt).train()  # type: ignore[call-overload]
    opt = torch.optim.SGD(
        model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4, fused=True
    )
    x = torch.randn(bs, 1, 28, 28).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (bs,))
    loss_fn = torch.nn.CrossEntropyLoss()

    def run(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                pred = model(x)
            loss_fn(pred.float(), y).backward()
            opt.step()
            opt.zero_grad()
        return time.perf_counter() - start

    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--part", type=int, nargs="+", default=[1, 2, 4, 5], help="3 (CUDA) only when named"
    )
    parser.add_argument("--repeats", type=int, default=5, help="interleaved runs per loop")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], help="part 1")
    parser.add_argument(
        "--malloc-default",
        action="store_true",
        help="part 1: leave glibc's malloc thresholds at their defaults (train/memory.py)",
    )
    parser.add_argument("--epochs", type=int, default=10, help="epochs of the seed recipe")
    parser.add_argument("--tool", nargs="*", default=[], help="overrides for the tool recipe")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="part 2: one run of each per seed"
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument(
        "--seed-result",
        nargs=3,
        type=float,
        metavar=("ACC", "SECONDS", "LR"),
        help="reuse an earlier seed-recipe run instead of training it again",
    )
    args = parser.parse_args(argv)
    print(f"machine: {machine()}")
    steps: dict[int, Callable[[], None]] = {
        1: lambda: part1(args.repeats, args.precision, args.malloc_default),
        2: lambda: part2(args.epochs, args.tool, args.seeds, args.seed_result),
        3: part3,
        4: lambda: part4(args.repeats),
        5: lambda: part5(args.repeats, args.batches),
    }
    for part in args.part:
        steps[part]()


if __name__ == "__main__":
    main()
