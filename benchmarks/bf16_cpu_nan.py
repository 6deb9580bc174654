"""Does bf16 autocast training on this CPU give NaN losses? Run by hand, never in tests.

Repeats, in one process, the batch-fallback run of tests/train/test_batch_size.py (resnet18 on
4096 synthetic 16x16 images, 2 epochs, batch 512 with an out-of-memory injected at epoch 2
step 3 above batch 128, so each repeat trains at 512, 256 and 128) and prints each repeat's
halvings: a `diverged` one is a NaN loss. Why `trainer.precision: auto` is fp32 on CPUs.

    OMP_NUM_THREADS=1 python benchmarks/bf16_cpu_nan.py --repeats 6 trainer.precision=bf16
    OMP_NUM_THREADS=1 python benchmarks/bf16_cpu_nan.py --repeats 6 trainer.precision=fp32
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kmnist_sweep.data.datasets import load_dataset  # noqa: E402
from kmnist_sweep.train import batch_size, engine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("overrides", nargs="*", help="e.g. trainer.precision=bf16")
    args = parser.parse_args()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[
                "data=synthetic",
                "data.n_train=4096",
                "data.image_size=16",
                "trainer.epochs=2",
                "debug.inject_oom={above: 128, epoch: 2, step: 3}",
                *args.overrides,
            ],
        )
    data = load_dataset(cfg.data)

    def run(bs: int) -> engine.TrainResult:
        learn = engine.build_learner(cfg, data, batch_size=bs)
        return engine.train(cfg, data, learn=learn, quiet=True, cbs=batch_size.guards(cfg))

    nans = 0
    for repeat in range(args.repeats):
        record = batch_size.Fallback(512)
        batch_size.fit_with_fallback(run, record, 16)
        causes = [f"{h.from_bs}: {h.cause} ({h.detail})" for h in record.halvings]
        nans += any(h.cause == "diverged" for h in record.halvings)
        print(f"repeat {repeat}: {'; '.join(causes)}", flush=True)
    print(f"{' '.join(args.overrides) or 'defaults'}: {nans} of {args.repeats} repeats: NaN")


if __name__ == "__main__":
    main()
