"""Memory benchmark, run by hand: `python benchmarks/memory.py [--steps 20] [--data DIR]`.

Peak resident memory (VmHWM) of one worker process that loads a dataset from files in the
release formats and trains on it, for a K49-sized set (232,365 + 38,547 images, 28x28, .npz)
and a Kuzushiji-Kanji-sized one (140,424 images, 64x64, 3832 classes, a tar of PNGs). Each
is run again on a 1,000-image set in the same format; the difference is what the data costs
a worker, to compare with the images' own size as uint8.

Each run is a fresh process (`--child`) that composes the config as the CLI does, calls
`load_dataset` and `engine.train` (one epoch: a trial's code path), on a training
loader cut to its first `--steps` batches (the peak is reached in the first steps; a full K49
epoch takes minutes on a CPU), then validates on the whole valid split as every epoch does.
The Kanji tar is decoded once into its cache by an untimed first run, as a user's first run
does; the measured runs read the cache. Each set is measured `--repeats` times (median: a
run's peak varies from run to run). Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MB = 1024 * 1024
K49 = {"train": 232_365, "test": 38_547, "classes": 49}  # the release's counts
KANJI = {"images": 140_424, "classes": 3832}
SMALL = 1000  # images in the baseline set of each format


# ------------------------------------------------------------------ files in the real formats


def write_k49(root: Path, n_train: int, n_test: int) -> None:
    """k49-{train,test}-{imgs,labels}.npz (compressed, one `arr_0` each), as released, with
    imbalanced labels (class k drawn with weight k + 1, like K49's 400-to-7000 spread)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    weights = np.arange(1, K49["classes"] + 1, dtype=np.float64)
    for part, n in (("train", n_train), ("test", n_test)):
        labels = rng.choice(K49["classes"], size=n, p=weights / weights.sum()).astype(np.uint8)
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        np.savez_compressed(root / f"k49-{part}-imgs.npz", arr_0=images)
        np.savez_compressed(root / f"k49-{part}-labels.npz", arr_0=labels)


def write_kanji(path: Path, n_images: int, n_classes: int) -> None:
    """kkanji.tar's layout, kkanji2/U+XXXX/<id>.png: `n_images` 64x64 PNGs spread evenly over
    `n_classes` code points from U+4E00. Each image is its class's 8x8 block pattern with its
    id in two pixels, so the tar stays small (random pixels would make it 600 MB)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    patterns = (rng.random((n_classes, 8, 8)) < 0.5).astype(np.uint8) * 255
    partial = path.with_suffix(".partial")
    with tarfile.open(partial, "w") as tar:
        for i in range(n_images):
            label = i % n_classes
            image = np.kron(patterns[label], np.ones((8, 8), dtype=np.uint8))
            image[0, 0], image[0, 1] = (i // 256) % 256, i % 256
            buffer = io.BytesIO()
            Image.fromarray(image, mode="L").save(buffer, format="PNG")
            member = tarfile.TarInfo(f"kkanji2/U+{0x4E00 + label:04X}/{i:08x}.png")
            member.size = buffer.tell()
            buffer.seek(0)
            tar.addfile(member, buffer)
    partial.replace(path)


def make_sets(data: Path) -> dict[str, tuple[Path, int]]:
    """{set name: (folder, images)}; files already there from an earlier run are reused."""
    sets = {
        "k49": (data / "k49", K49["train"] + K49["test"]),
        "k49-small": (data / "k49-small", SMALL),
        "kkanji": (data / "kkanji", KANJI["images"]),
        "kkanji-small": (data / "kkanji-small", SMALL),
    }
    for name, (root, n) in sets.items():
        if name.startswith("k49") and not (root / "k49-test-labels.npz").is_file():
            print(f"writing {name} ({n} images) to {root}", flush=True)
            n_test = K49["test"] if n > SMALL else SMALL // 5
            write_k49(root, n - n_test, n_test)
        if name.startswith("kkanji") and not (root / "kkanji.tar").is_file():
            print(f"writing {name} ({n} images) to {root}", flush=True)
            # The small set has 250 classes of 4 (1 test, 1 valid, 2 train each): a class
            # needs 3 images to reach every split.
            write_kanji(root / "kkanji.tar", n, KANJI["classes"] if n > SMALL else SMALL // 4)
    return sets


# ------------------------------------------------------------------ one measured worker


def child(overrides: list[str], steps: int) -> None:
    """Load and train as a trial does; print one JSON line of what memory it took."""
    import torch
    from hydra import compose, initialize_config_dir

    from kmnist_sweep.data.datasets import load_dataset
    from kmnist_sweep.train import engine
    from kmnist_sweep.train.loader import DeviceLoader

    class FirstBatches(DeviceLoader):
        """The training loader cut to its first `steps` batches (same tensors, no copy).
        Its length stays the whole epoch's: batches are cut from it, and one-cycle's
        schedule is set by it."""

        def __iter__(self):  # type: ignore[no-untyped-def]
            return itertools.islice(super().__iter__(), steps)

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    dataset = load_dataset(cfg.data)
    loaded = vm_hwm()
    learn = engine.build_learner(cfg, dataset)
    cut = FirstBatches.__new__(FirstBatches)
    cut.__dict__.update(learn.dls.train.__dict__)
    learn.dls.loaders[0] = cut
    result = engine.train(cfg, dataset, learn=learn, quiet=True)
    splits = (dataset.train, dataset.valid, dataset.test)
    row = {
        "images": sum(len(s) for s in splits),
        "uint8_bytes": sum(s.images.numel() for s in splits),
        "classes": dataset.num_classes,
        "peak_after_load": loaded,
        "peak": vm_hwm(),
        "val": result.valid,
        "torch": torch.__version__,
    }
    print("RESULT " + json.dumps(row), flush=True)


def vm_hwm() -> int:
    """Bytes: this process's peak resident set since it started."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def measure_median(root: Path, dataset: str, steps: int, extra: list[str], n: int) -> dict:
    """`measure` n times: the median of each figure (one run's peak varies by up to 80 MB)."""
    runs = [measure(root, dataset, steps, extra) for _ in range(n)]
    row = dict(runs[0])
    for key in ("peak_after_load", "peak"):
        row[key] = statistics.median(r[key] for r in runs)
    return row


def measure(root: Path, dataset: str, steps: int, extra: list[str]) -> dict:
    overrides = [
        f"data={dataset}",
        f"data.root={root}",
        "data.download=false",
        "tracking=disabled",
        "trainer.epochs=1",
        # The recipe the recorded figures were measured with, whatever the defaults are.
        "trainer.batch_size=128",
        "trainer.optimizer=adamw",
        *([] if dataset == "kkanji" else ["data.verify=false"]),
        *extra,
    ]
    cmd = [sys.executable, __file__, "--child", "--steps", str(steps), *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.exit(f"memory.py: {' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(lines[-1][len("RESULT ") :]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=20, help="training batches per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per set (median)")
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(tempfile.gettempdir()) / "kmnist_sweep-memory-bench",
        help="folder for the synthetic files (reused between runs)",
    )
    parser.add_argument("overrides", nargs="*", help="config overrides for every run")
    args = parser.parse_args()
    if args.child:
        child(args.overrides, args.steps)
        return
    sets = make_sets(args.data)
    for name in ("kkanji", "kkanji-small"):  # decode the tars into their caches, untimed
        measure(sets[name][0], "kkanji", 1, args.overrides)
    print(f"\n{platform.machine()}, {os.cpu_count()} CPUs; overrides: {args.overrides or 'none'}")
    print(
        f"one epoch stopped after {args.steps} training batches, then full validation; "
        f"median of {args.repeats} runs each\n"
    )
    print(
        "| set | images | classes | uint8 MB | peak RSS MB: loaded / trained "
        "| 1,000-image set: loaded / trained | difference MB: loaded / trained "
        "| trained difference / uint8 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in ("k49", "kkanji"):
        full = measure_median(sets[name][0], name, args.steps, args.overrides, args.repeats)
        small = measure_median(
            sets[f"{name}-small"][0], name, args.steps, args.overrides, args.repeats
        )
        load, peak = (full[k] - small[k] for k in ("peak_after_load", "peak"))
        print(
            f"| {name} | {full['images']:,} | {full['classes']} | {full['uint8_bytes'] / MB:.0f} "
            f"| {full['peak_after_load'] / MB:.0f} / {full['peak'] / MB:.0f} "
            f"| {small['peak_after_load'] / MB:.0f} / {small['peak'] / MB:.0f} "
            f"| {load / MB:.0f} / {peak / MB:.0f} | **{peak / full['uint8_bytes']:.2f}** |",
            flush=True,
        )


if __name__ == "__main__":
    main()
