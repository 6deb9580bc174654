"""Fuzz the image reader `predict` runs on users' files: nothing but a one-line UserError may
come out of it, whatever the bytes.

    python -m tests.fuzz.fuzz_image_reader -atheris_runs=1000000      # libFuzzer flags
    python -m tests.fuzz.fuzz_image_reader CORPUS_DIR -max_total_time=60

Starts from the shipped example characters and the other forms users have (JPEG, EXIF
rotation, transparency, 16-bit, 1-bit); new inputs that reach new code go to a temporary
corpus folder unless one is named. A failing input is saved as crash-<hash> in the current
folder: run the script with that file to reproduce it.
"""

from __future__ import annotations

import os
import sys

import atheris

with atheris.instrument_imports(include=["kmnist_sweep", "PIL"]):
    from PIL import Image

    from kmnist_sweep.data import images
    from kmnist_sweep.errors import UserError

    Image.init()  # Pillow's format plugins, imported here to be instrumented too

from tests.fuzz.harness import SHM, fuzz
from tests.fuzz.seeds import image_seeds

# The reader's pixel limit is Pillow's; fuzzed at 4 megapixels, not 89, so that an input
# declaring a large image costs milliseconds, not seconds, and a million inputs fit an hour.
# The same checks run; tests/results/test_final_predict.py reads a 40000x2000 strip at full size.
Image.MAX_IMAGE_PIXELS = images.MAX_PIXELS = 4_000_000

TARGET = SHM / f"fuzz-image-{os.getpid()}.png"  # read_image reads a path, as predict does


def test_one_input(data: bytes) -> None:
    TARGET.write_bytes(data)
    try:
        images.read_image(TARGET, 28)
    except UserError as exc:
        assert "\n" not in str(exc), repr(str(exc))


def main(argv: list[str]) -> None:
    fuzz(argv, test_one_input, lambda corpus: image_seeds(), TARGET, "image")


if __name__ == "__main__":
    main(sys.argv)
