"""Benchmark part 3, CUDA: `python benchmarks/gpu.py --out FIGURES.md [--budget-s 270]`.

Run on a GPU machine by `bash benchmarks/gpu_check.sh`; `--tiny` runs every section with
small sizes on the CPU, so the script is known to work before a GPU session. Sections, in
the order they run (the cheap ones with a target first; every table is appended to --out
as it is measured, and a section that would outrun --budget-s is cut, not killed):

b. seconds per KMNIST-size epoch: 60,000 training images, then 10,000 validated;
c. the engine (fastai step, device loader) vs a bare PyTorch loop on the same batches, at
   equal precision, layout and optimiser;
d. trials per hour with 1, 2, 4 and 8 trials packed on one GPU (gpu_pack.py);
a. training images/s for resnet18/34/50, imagenet and small stems, batch 128/512/2048,
   bf16 or fp32, channels-last or not (72 rows);
e. torch.compile: compile time, step speed-up, and what a second trial of the same shape
   pays (same process: a fresh model; new process: the compile caches on disk);
f. `predict`'s inference: images/s of the class probabilities a bundle's model gives, with
   1 and 5 test-time views (the path `predict` and `final`'s test take, in fp32).
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import gpu_compile
import gpu_pack
import torch
from gpu_lib import (
    Budget,
    Figures,
    Found,
    TrainClock,
    error_line,
    fit,
    learner,
    random_data,
    run_rows,
    sizes,
    sync,
)

from kmnist_sweep.config.device import pick_device
from kmnist_sweep.train import engine
from kmnist_sweep.train.views import class_probabilities

TARGETS = (
    "ResNet-18 imagenet stem bf16 >= 100,000 training images/s; a 60k-image epoch < 1 s; "
    "4 packed trials >= 2x the trials/hour of 1; engine >= 0.95x the bare loop"
)


# ------------------------------------------------------------------ a. throughput grid


def grid(figures: Figures, args: argparse.Namespace, budget: Budget, found: Found) -> None:
    s = sizes(args.tiny)
    skip = 1 if args.tiny else 3  # warm-up steps: allocator, cuDNN heuristics, kernel loads

    def measure(arch: str, stem: str, bs: int, bf16: bool, cl: bool) -> str:
        steps = s["grid_steps"] or max(8, min(64, 16384 // bs))  # ~16k images, 8 steps least
        values = {"model.arch": arch, "model.stem": stem, "trainer.batch_size": bs}
        values.update(
            {"trainer.precision": "bf16" if bf16 else "fp32", "trainer.channels_last": cl}
        )
        learn = learner(args.device, random_data((skip + steps) * bs, 256), **values)
        clock = TrainClock(skip)
        fit(learn, 1, clock)
        rate = clock.steps * bs / clock.train_s[0]
        found[f"a/{arch}/{stem}/{values['trainer.precision']}/{bs}/{cl}"] = rate
        return f"{rate:,.0f} | {clock.train_s[0] / clock.steps * 1000:.2f}"

    figures(
        f"\n### 3a. Training images/s (engine step, random 28x28 images, {skip} warm-up steps "
        "then steps for ~16k images, 8 at the least)\n"
    )
    figures("| model | stem | batch | precision | channels_last | images/s | ms/step |")
    figures("|---|---|---|---|---|---|---|")
    variants = ((True, True), (True, False), (False, True), (False, False))
    run_rows(
        figures,
        args,
        budget,
        (
            (
                f"{arch} | {stem} | {bs} | {'bf16' if bf16 else 'fp32'} | {cl}",
                partial(measure, arch, stem, bs, bf16, cl),
            )
            for arch, stem, bs, (bf16, cl) in itertools.product(
                s["archs"], ("imagenet", "small"), s["batches"], variants
            )
        ),
    )


# ------------------------------------------------------------------ b. epoch time


def epochs(figures: Figures, args: argparse.Namespace, budget: Budget, found: Found) -> None:
    n_train, n_valid, batches = sizes(args.tiny)["epoch"]
    data = random_data(n_train, n_valid)

    def measure(bs: int, bench: bool) -> str:
        torch.backends.cudnn.benchmark = bench  # cuDNN tries its algorithms once per shape
        try:
            learn = learner(args.device, data, **{"trainer.batch_size": bs})
            clock = TrainClock()
            fit(learn, 2, clock)  # the first epoch pays for allocations and kernel loads
        finally:
            torch.backends.cudnn.benchmark = False
        train_s, epoch_s = clock.train_s[-1], clock.epoch_s[-1]
        found[f"b/{bs}/{bench}"] = epoch_s
        return f"{train_s:.2f} | {epoch_s:.2f} | {n_train / train_s:,.0f}"

    figures(
        f"\n### 3b. One epoch of {n_train:,} images, then {n_valid:,} validated (resnet18 "
        "imagenet stem, the tool's defaults: precision and channels_last auto; 2nd epoch)\n"
    )
    figures("| batch | cudnn.benchmark | train s | with validation s | images/s |")
    figures("|---|---|---|---|---|")
    runs = [(bs, False) for bs in batches] + [(batches[1], True)]
    run_rows(figures, args, budget, ((f"{bs} | {b}", partial(measure, bs, b)) for bs, b in runs))


# ------------------------------------------------------------------ c. engine vs bare loop


def bare_epoch(learn: engine.Learner, bf16: bool, opt: torch.optim.Optimizer) -> float:
    """One epoch of a plain loop over the learner's own loader, model and loss: seconds."""
    model, loss_fn, device = learn.model, learn.loss_func, learn.dls.train.device
    model.train()
    sync(device)
    start = time.perf_counter()
    for x, y in learn.dls.train:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model(x).float(), y)  # the loss in fp32, as the engine's
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - start


def engine_vs_bare(
    figures: Figures, args: argparse.Namespace, budget: Budget, found: Found
) -> None:
    batches, steps, repeats = sizes(args.tiny)["bare"]

    def measure(bs: int) -> str:
        # The bare loop's optimiser, whatever the defaults are: fused AdamW.
        pinned = {"trainer.batch_size": bs, "trainer.optimizer": "adamw"}
        learn = learner(args.device, random_data(steps * bs, 256), **pinned)
        bf16 = any(isinstance(cb, engine.Autocast) for cb in learn.cbs)  # as the engine chose
        opt = torch.optim.AdamW(learn.model.parameters(), lr=1e-4, fused=True)
        clock = TrainClock()
        bare_epoch(learn, bf16, opt)  # warm-up of both loops: allocator, kernels
        fit(learn, 1, clock)
        bare, tool = [], []
        for _ in range(repeats):  # interleaved: a drift in clocks or load hits both alike
            bare.append(steps * bs / bare_epoch(learn, bf16, opt))
            fit(learn, 1, clock)
            tool.append(steps * bs / clock.train_s[-1])
        b, t = statistics.median(bare), statistics.median(tool)
        found[f"c/{bs}"] = t / b
        return f"{'bf16' if bf16 else 'fp32'} | {b:,.0f} | {t:,.0f} | {t / b:.3f}"

    figures(
        "\n### 3c. Engine vs bare PyTorch loop (resnet18 imagenet stem, the tool's precision "
        f"and layout, fused AdamW in both; median of {repeats} interleaved epochs of "
        f"{steps} steps, validation outside the clock)\n"
    )
    figures("| batch | precision | bare images/s | engine images/s | engine/bare |")
    figures("|---|---|---|---|---|")
    run_rows(figures, args, budget, ((str(bs), partial(measure, bs)) for bs in batches))


# ------------------------------------------------------------------ d. packed trials


def packed(figures: Figures, args: argparse.Namespace, budget: Budget, found: Found) -> None:
    counts, trials, batch, images = sizes(args.tiny)["pack"]
    pack = argparse.Namespace(device=args.device, trials=trials, batch=batch, epochs=1)
    pack.images, pack.keep_s = images, args.keep_s + args.reserve_s
    try:
        per_hour = gpu_pack.measure(figures, pack, budget, counts)
    except Exception as exc:  # a worker that died: its log's tail is on stderr
        figures(f"| failed: {error_line(exc)} | | | | | |")
        return
    found.update({f"d/{n}": v for n, v in per_hour.items()})


# ------------------------------------------------------------------ f. predict


def predict_speed(
    figures: Figures, args: argparse.Namespace, budget: Budget, found: Found
) -> None:
    n, batches = sizes(args.tiny)["predict"]
    data = random_data(256, n)

    def measure(bs: int, views: int) -> str:
        learn = learner(args.device, data)
        model, device = learn.model, learn.dls.train.device
        images = data.valid.images
        class_probabilities(model, images[:bs], 0.5, 0.25, views=views, device=device, batch=bs)
        sync(device)  # the first call pays for kernel loads
        start = time.perf_counter()
        class_probabilities(model, images, 0.5, 0.25, views=views, device=device, batch=bs)
        sync(device)
        rate = n / (time.perf_counter() - start)
        found[f"f/{bs}/{views}"] = rate
        return f"{rate:,.0f}"

    figures(
        f"\n### 3f. predict: class probabilities of {n:,} images (resnet18 imagenet stem, fp32, "
        "eval mode, the uint8 images moved to the device per batch as predict does)\n"
    )
    figures("| batch | views | images/s |")
    figures("|---|---|---|")
    runs = [(bs, v) for bs in batches for v in (1, 5)]
    run_rows(figures, args, budget, ((f"{bs} | {v}", partial(measure, bs, v)) for bs, v in runs))


# ------------------------------------------------------------------ summary and main


def summary(figures: Figures, found: Found, tiny: bool) -> None:
    """Each target, what was measured against it, and whether it is met."""

    def pick(prefix: str, best: Callable[..., float | None]) -> float | None:
        return best((v for k, v in found.items() if k.startswith(prefix)), default=None)

    gain = found["d/4"] / found["d/1"] if "d/1" in found and "d/4" in found else None
    rows = [  # target, value, how it is shown, met?
        ("resnet18 imagenet bf16 >= 100,000 images/s", pick("a/resnet18/imagenet/bf16/", max),
         "{:,.0f} (best batch, channels-last or not)", lambda v: v >= 100_000),
        ("60k-image epoch < 1 s", pick("b/", min), "{:.2f} s (best batch, with validation)",
         lambda v: v < 1.0),
        ("4 packed trials >= 2x trials/hour of 1", gain, "{:.2f}x", lambda v: v >= 2.0),
        ("engine >= 0.95x bare loop", pick("c/", min), "{:.3f} (worst batch)",
         lambda v: v >= 0.95),
    ]  # fmt: skip
    figures("\n### 3. Against the targets\n")
    figures("| target | measured | verdict |")
    figures("|---|---|---|")
    for target, value, shown, met in rows:
        if value is None:
            figures(f"| {target} | - | not measured |")
        else:
            verdict = "dry run" if tiny else ("met" if met(value) else "NOT met")
            figures(f"| {target} | {shown.format(value)} | {verdict} |")


def machine(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(pick_device(device))
        gpu = f"{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, "
        gpu += f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    else:
        gpu = "no GPU used"
    cpu = f"{platform.machine()}, {torch.get_num_threads()} threads"
    return f"{cpu}, {gpu}, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="append the markdown figures to this file")
    parser.add_argument("--budget-s", type=float, default=270.0, help="stop measuring after")
    parser.add_argument("--keep-s", type=float, default=10.0, help="budget a row must leave")
    parser.add_argument("--tiny", action="store_true", help="small sizes, on the CPU")
    parser.add_argument("--device", help="default: cuda (cpu with --tiny)")
    parser.add_argument("--sections", default="bcdfae", help="which of a-f to run, in order")
    args = parser.parse_args(argv)
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    if args.tiny:  # one thread per process (children too): a few shared cores, no spinning
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    figures, budget = Figures(args.out), Budget(args.budget_s)
    figures(f"\n## Benchmark part 3{' (--tiny: CPU dry run, not figures)' if args.tiny else ''}")
    figures(
        f"\nmachine: {machine(args.device)}; `python benchmarks/gpu.py {' '.join(sys.argv[1:])}`"
    )
    figures(f"\ntargets (H100/H200): {TARGETS}")
    found: Found = {}
    sections = {"a": grid, "b": epochs, "c": engine_vs_bare, "d": packed, "f": predict_speed}
    sections["e"] = gpu_compile.compile_section
    for i, section in enumerate(args.sections):
        start = time.perf_counter()
        # Time kept back for torch.compile when it runs later: a cold compile takes a minute.
        args.reserve_s = 90.0 if "e" in args.sections[i + 1 :] and not args.tiny else 0.0
        sections[section](figures, args, budget, found)
        print(f"(section {section}: {time.perf_counter() - start:.0f} s)", file=sys.stderr)
    summary(figures, found, args.tiny)


if __name__ == "__main__":
    main()
