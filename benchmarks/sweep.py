"""Sweep benchmark, run by hand: `python benchmarks/sweep.py [--budget 900] [--arms a b c e d]`.

What a sweep finds on kmnist_sample in one wall-clock budget (15 min by default), each arm
run through the CLI as a user runs it, one after another on the same machine:

  a. the shipped full search (TPE sampler, its pruner, trial 0 the defaults):
     `+sweep=full_cpu` without a GPU, `+sweep=full` with one (`--sweep` picks)
  b. the same without pruning
  c. plain random sampling without pruning (no queued defaults: every trial sampled)
  e. random sampling without pruning, trial 0 the defaults (what the queued start is worth)
  g. the budgeted sweep: `+sweep=budget_cpu study.budget=<budget>s`, which plans its trials
     and ends with its own final fit and bundle inside the budget (docs/budget.md)
  d. the seed article's recipe once (fastai DataBlock pipeline, vision_learner(resnet34),
     bs 128, lr_find minimum/10, 10 epochs; benchmarks/engine.py part 2's code)

A sweep arm gets SIGTERM when its budget has passed since its process started (start-up
and data loading count, about 10 s): the trial then running is recorded as failed, as a
Ctrl-C would, so every arm stops at the same wall time (`study.timeout` is set to the budget
too, so no trial starts after it; arm g ends by itself with its final fit, and is stopped
only at 1.5x the budget). The seed arm's clock starts before its DataBlock is
built and includes its LR finder. A sweep's best complete trial is then fit on train +
valid and tested on the held-out split by `python -m kmnist_sweep final` (not counted in
the budget). Writes `<out>/sweep_benchmark.png` (best validation accuracy over wall time,
each finished trial a mark) and prints a markdown table for docs/benchmarks.md;
`--replot` redraws the PNG from the arms' studies already in `<out>`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kmnist_sweep.data.datasets import load_dataset  # noqa: E402
from kmnist_sweep.results.bundle import load_model, read_bundle  # noqa: E402
from kmnist_sweep.results.predict import evaluate  # noqa: E402

ARMS = {
    "a": ("as shipped (TPE, its pruner)", []),
    "b": ("no pruning", ["study.pruner.type=none"]),
    "c": (
        "random sampling, no pruning",
        ["study.pruner.type=none", "study.sampler.type=random", "study.start_from_defaults=false"],
    ),
    "e": (
        "random sampling, no pruning, trial 0 the defaults",
        ["study.pruner.type=none", "study.sampler.type=random"],
    ),
    "g": ("budgeted: search and final fit inside the budget", []),
}
BUDGETED = "g"  # the arm whose own command ends with the final fit


@dataclass
class ArmResult:
    label: str
    curve: list[tuple[float, float]] = field(default_factory=list)  # (s, best val so far)
    # every finished trial: (s, its last reported val, "complete" | "pruned")
    points: list[tuple[float, float, str]] = field(default_factory=list)
    trials: str = ""  # complete / pruned / failed
    epochs: int = 0  # epochs trained, all trials
    best: str = ""  # the best trial's config
    best_val: float | None = None
    heldout: float | None = None  # one view per test image, as the seed arm is scored
    heldout_views: float | None = None  # the views `final` uses (trainer.test_views)
    wall: float | None = None  # seconds, the sweep and its final fit together


def arm_sweep(arm: str, sweep: str) -> str:
    """The sweep an arm runs: `sweep` (--sweep), except the budgeted arm's own."""
    return "budget_cpu" if arm == BUDGETED else sweep


def run_sweep(arm: str, sweep: str, budget: float, out: Path, extra: list[str]) -> ArmResult:
    label, overrides = ARMS[arm]
    budgeted = arm == BUDGETED
    sweep = arm_sweep(arm, sweep)
    label = f"+sweep={sweep} {label}"
    limit = (
        [f"study.budget={budget:.0f}s"]
        if budgeted
        else ["study.n_trials=1000", f"study.timeout={budget}"]
    )
    name = f"bench-{arm}"
    db = out / f"{name}.db"
    for stale in (db, out / f"{name}.db-wal", out / f"{name}.db-shm"):
        stale.unlink(missing_ok=True)  # each arm starts from an empty study
    shutil.rmtree(out / name, ignore_errors=True)  # and without an earlier best.yaml
    cmd = [
        sys.executable, "-m", "kmnist_sweep", f"+sweep={sweep}", "data=kmnist_sample",
        f"study.name={name}", f"study.storage=sqlite:///{db}", f"study.output_dir={out / name}",
        *limit, "tracking=disabled",
        f"hydra.run.dir={out / name / 'hydra'}", *overrides, *extra,
    ]  # fmt: skip
    print(f"[{arm}] {label}: {' '.join(cmd[2:])}", flush=True)
    start = time.time()
    with open(out / f"{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=1.5 * budget if budgeted else budget)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # the running trial is failed and recorded
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if proc.returncode not in (0, 143) or not db.is_file():  # 143: stopped by the SIGTERM
        tail = (out / f"{name}.log").read_text()[-2000:]
        sys.exit(f"[{arm}] the sweep exited with {proc.returncode}:\n{tail}")
    result = study_result(label, f"sqlite:///{db}", name, start)
    if budgeted:  # its own final fit: the numbers its last lines print
        result.wall = time.time() - start
        result.heldout_views, result.heldout = printed_accuracy((out / f"{name}.log").read_text())
    elif result.best_val is not None:
        result.heldout_views, result.heldout = final_accuracy(
            out / name, out / f"{name}-final.log"
        )
        result.wall = time.time() - start
    return result


def study_result(label: str, storage: str, name: str, start: float | None) -> ArmResult:
    """The arm's figures from its study; its clock starts at `start` (None: when its first
    trial started, which leaves the ~10 s of start-up before it off the clock)."""
    study = optuna.load_study(study_name=name, storage=storage)
    trials = study.get_trials(deepcopy=False)
    if start is None:
        start = min(t.datetime_start.timestamp() for t in trials if t.datetime_start)
    result = ArmResult(label)
    counts = {s: sum(t.state == s for t in trials) for s in TrialState}
    result.trials = (
        f"{counts[TrialState.COMPLETE]} / {counts[TrialState.PRUNED]} / {counts[TrialState.FAIL]}"
    )
    result.epochs = sum(len(t.intermediate_values) for t in trials)
    done = sorted(
        (t for t in trials if t.state == TrialState.COMPLETE and t.value is not None),
        key=lambda t: t.datetime_complete or 0,
    )
    so_far = None
    for t in trials:
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and t.intermediate_values:
            seconds = t.datetime_complete.timestamp() - start  # type: ignore[union-attr]
            last = t.intermediate_values[max(t.intermediate_values)]
            result.points.append((seconds, float(last), t.state.name.lower()))
    for t in done:
        if so_far is None or t.value > so_far:  # type: ignore[operator]
            so_far = t.value
            seconds = t.datetime_complete.timestamp() - start  # type: ignore[union-attr]
            result.curve.append((seconds, float(t.value)))  # type: ignore[arg-type]
    if done:
        best = study.best_trial  # the trial best.yaml names, which `final` fits
        runs = study.user_attrs.get("budget/runs")
        if runs:  # a budgeted sweep's answer: the best of its highest rung
            best = study.trials[int(runs[-1]["answer"]["trial"])]
        result.best_val = float(best.value)  # type: ignore[arg-type]
        result.best = ", ".join(shown(k, v) for k, v in best.params.items())
    return result


def shown(name: str, value: object) -> str:
    """`key=value` as a user would override it (pow2 keys are stored as their log2)."""
    if name.endswith(".log2"):
        return f"{name.removesuffix('.log2').split('.')[-1]}={2 ** int(value)}"  # type: ignore[call-overload]
    text = f"{value:.3g}" if isinstance(value, float) else str(value)
    return f"{name.split('.')[-1]}={text}"


def final_accuracy(study_dir: Path, log_path: Path) -> tuple[float | None, float | None]:
    """`final` on the study: (the test accuracy it prints, with its views; the same bundle's
    accuracy with one view, which is how the seed arm is scored)."""
    cmd = [sys.executable, "-m", "kmnist_sweep", "final", str(study_dir)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    log_path.write_text(done.stdout + done.stderr)
    return printed_accuracy(done.stdout)


def printed_accuracy(stdout: str) -> tuple[float | None, float | None]:
    """From the lines `final` prints (a budgeted sweep prints them too): (its test accuracy,
    with its views; its bundle's with one view)."""
    found = re.search(r"test/acc (\d\.\d+)", stdout)
    path = re.search(r"^bundle: (.+)$", stdout, re.M)
    if not (found and path):
        return None, None
    bundle_path = path[1] if Path(path[1]).is_absolute() else REPO / path[1]
    bundle = dataclasses.replace(read_bundle(Path(bundle_path)), views=1)
    data = load_dataset(OmegaConf.create(bundle.config).data)
    cpu = torch.device("cpu")
    model = load_model(bundle, Path(bundle_path), cpu)
    return float(found[1]), evaluate(model, bundle, data.test, cpu)["test/acc"]


def run_seed(out: Path) -> ArmResult:
    """The article's recipe once; its accuracy is on the held-out split at every epoch."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from engine import heldout_dataset, seed_recipe

    print("[d] seed recipe", flush=True)
    curve, lr = seed_recipe(heldout_dataset(), 10)
    result = ArmResult(f"seed recipe once (resnet34, bs 128, lr {lr:.2e}, 10 epochs)")
    best = 0.0
    for seconds, acc in curve:
        if acc > best:
            best = acc
            result.curve.append((seconds, acc))
    result.trials, result.epochs = "1 / 0 / 0", len(curve)
    result.best, result.heldout = "the article's recipe", curve[-1][1]
    return result


def plot(results: dict[str, ArmResult], budget: float, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    top = 0.0
    for arm, r in results.items():
        if r.curve:
            xs = [t / 60 for t, _ in r.curve] + [max(budget, r.curve[-1][0]) / 60]
            ys = [v for _, v in r.curve] + [r.curve[-1][1]]
            line = ax.step(xs, ys, where="post", label=f"{arm}. {r.label}")[0]
            top = max(top, *ys)
            for state, marker in (("complete", "o"), ("pruned", "x")):
                done = [(t / 60, v) for t, v, s in r.points if s == state]
                if done:  # each trial where it ended: what the best-so-far line hides
                    at, acc = [t for t, _ in done], [v for _, v in done]
                    ax.scatter(at, acc, marker=marker, color=line.get_color(), alpha=0.6)
    ax.axvline(budget / 60, color="grey", linestyle=":", label="budget")
    ax.set_xlabel("wall time (min)")
    ax.set_ylabel("accuracy: line best so far, marks each trial\n(sweeps: val; seed: held-out)")
    ax.set_ylim(0.9, max(top + 0.004, 0.91))
    ax.set_title("kmnist_sample: each search in the same wall time (o complete, x pruned)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=900, help="seconds per sweep arm")
    parser.add_argument("--arms", nargs="+", default=["a", "b", "c", "e", "d"])
    default_sweep = "full" if torch.cuda.is_available() else "full_cpu"
    parser.add_argument("--sweep", default=default_sweep, help="the sweep of arms a, b, c and e")
    parser.add_argument("--out", type=Path, default=REPO / "sweeps" / "benchmark")
    parser.add_argument(
        "--replot",
        action="store_true",
        help="redraw the PNG from the sweep arms' studies in --out (arm d has none: left out)",
    )
    parser.add_argument("overrides", nargs="*", help="extra overrides for every sweep arm")
    args = parser.parse_args()
    args.out = args.out.resolve()  # the sweeps run from the repository's root
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_MODE", "disabled")
    results: dict[str, ArmResult] = {}
    for arm in args.arms:
        if args.replot and arm != "d":  # nothing is run or refit: no held-out figures
            name = f"bench-{arm}"
            if not (args.out / f"{name}.db").is_file():
                print(f"[{arm}] no study {args.out / name}.db: left out of the plot")
                continue
            label = f"+sweep={arm_sweep(arm, args.sweep)} {ARMS[arm][0]}"
            results[arm] = study_result(label, f"sqlite:///{args.out / name}.db", name, None)
        elif args.replot:
            continue  # the seed recipe keeps no study; replotting must not retrain it
        elif arm == "d":
            results[arm] = run_seed(args.out)
        else:
            results[arm] = run_sweep(arm, args.sweep, args.budget, args.out, args.overrides)
    png = args.out / "sweep_benchmark.png"
    plot(results, args.budget, png)
    print(f"\nbudget {args.budget:.0f} s per sweep arm; plot: {png}\n")
    print(
        "| arm | trials complete / pruned / failed | epochs trained | best val/acc "
        "| best config | held-out acc, 1 view | held-out acc, `final` | wall s, with `final` |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for arm, r in results.items():
        val = f"{r.best_val:.4f}" if r.best_val is not None else "—"
        held, views = (f"{v:.4f}" if v is not None else "—" for v in (r.heldout, r.heldout_views))
        wall = f"{r.wall:.0f}" if r.wall is not None else "—"
        print(
            f"| {arm}. {r.label} | {r.trials} | {r.epochs} | {val} | {r.best} | {held} "
            f"| {views} | {wall} |"
        )


if __name__ == "__main__":
    main()
