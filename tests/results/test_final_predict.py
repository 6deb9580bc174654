"""From a study to a model and its predictions, as a user runs it: a tiny sweep on the bundled
KMNIST sample, `final` on it, the bundle reloaded and re-evaluated, `predict` on PNG files.

The model is real (trained on the 8k sample images for FINAL_EPOCHS epochs) so that the
accuracy checks mean something; one module fixture trains it once for every test here.
Bad input to `final` and `predict` is in docs/bad-input.md (tests/test_bad_input.py).
"""

from __future__ import annotations

import csv
import re
import resource
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf
from PIL import Image, ImageOps

import kmnist_sweep  # noqa: F401  (torchvision compat first)
from kmnist_sweep.data.datasets import KMNIST_CLASSES, load_dataset
from kmnist_sweep.data.download import MD5
from kmnist_sweep.results.bundle import FORMAT_VERSION, PACKAGES, load_model, read_bundle
from kmnist_sweep.results.predict import evaluate
from tests.conftest import CLI_ENV, REPO, run_cli

pytestmark = pytest.mark.slow

FINAL_EPOCHS = 6  # epochs of the final fit: a real model, not a random one
PASSWORD = "hunter2-not-for-bundles"


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, cwd=cwd, timeout=1800)


def shown(out: subprocess.CompletedProcess[str]) -> str:
    return f"exit {out.returncode}\nstdout: {out.stdout[-3000:]}\nstderr: {out.stderr[-3000:]}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """(working folder, bundle, final's stdout): a one-trial batch-size sweep (its LR range
    test, no epoch: the trial only names a config), then `final` on it for FINAL_EPOCHS."""
    root = tmp_path_factory.mktemp("final")
    sweep = cli(
        "+sweep=batchsize",
        "data=kmnist_sample",
        "trainer.epochs=0",
        "study.pruner.max_resource=1",  # follows trainer.epochs, and must be >= 1
        "study.n_trials=1",
        "++search_space.trainer.batch_size.low=128",
        "++search_space.trainer.batch_size.high=128",
        "tracking=disabled",
        cwd=root,
    )
    assert sweep.returncode == 0, shown(sweep)
    study_dir = root / "sweeps" / "batchsize-kmnist_sample"
    # A storage URL with a password, as an older, unmasked config.yaml would hold it: the
    # bundle must not carry it. best.yaml holds the trial, so final never opens the storage.
    config = study_dir / "config.yaml"
    text = config.read_text()
    url = "sqlite:///storage/batchsize-kmnist_sample.db"
    assert url in text
    config.write_text(text.replace(url, f"postgresql://kmnist:{PASSWORD}@db.example/kmnist"))
    final = cli("final", str(study_dir), f"trainer.epochs={FINAL_EPOCHS}", cwd=root)
    assert final.returncode == 0, shown(final)
    assert "Traceback" not in final.stdout + final.stderr
    return root, study_dir / "model-trial0.zip", final.stdout


def printed_accuracy(stdout: str) -> float:
    found = re.search(r"^final: test/acc ([\d.]+) on 2000 test images \(trial 0 .*$", stdout, re.M)
    assert found, stdout
    assert "not the official benchmark protocol" in found.group(0)  # the sample's note
    return float(found.group(1))


def test_final_bundles_the_trial_and_its_accuracy_reproduces(
    trained: tuple[Path, Path, str],
) -> None:
    root, path, stdout = trained
    assert re.search(rf"^bundle: .*{re.escape(path.name)}$", stdout, re.M)
    best = yaml.safe_load((path.parent / "best.yaml").read_text())
    bundle = read_bundle(path)

    # What the bundle says about itself.
    assert bundle.classes == KMNIST_CLASSES
    assert (bundle.image_size, bundle.data["name"]) == (28, "kmnist_sample")
    assert "not the official benchmark protocol" in bundle.data["note"]
    assert bundle.data["files"] == {name: MD5[name] for name in bundle.data["files"]}
    assert sorted(bundle.data["files"]) == [
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]
    assert set(bundle.versions) == set(PACKAGES)
    assert bundle.versions["torch"] == torch.__version__
    assert bundle.source["trial"] == best["trial"] == 0
    assert bundle.config["trainer"]["batch_size"] == 128  # the trial's value
    assert bundle.config["trainer"]["epochs"] == FINAL_EPOCHS  # the command line's
    assert bundle.config["search_space"] == {}
    assert bundle.config["study"]["storage"] == "postgresql://kmnist:***@db.example/kmnist"
    assert PASSWORD.encode() not in path.read_bytes()
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True)
    if head.returncode == 0:  # a checkout: the bundle names its commit
        assert bundle.git_commit is not None
        assert bundle.git_commit.startswith(head.stdout.decode().strip())
    with zipfile.ZipFile(path) as zf:
        meta = yaml.safe_load(zf.read("bundle.json"))  # JSON is YAML
    assert meta["format_version"] == FORMAT_VERSION

    # The printed accuracy is the stored one, and the saved weights score it again.
    accuracy = printed_accuracy(stdout)
    assert bundle.metrics["test/images"] == 2000
    assert f"{bundle.metrics['test/acc']:.4f}" == f"{accuracy:.4f}"
    cfg = OmegaConf.create(bundle.config)
    dataset = load_dataset(cfg.data)
    model = load_model(bundle, path, torch.device("cpu"))
    again = evaluate(model, bundle, dataset.test, torch.device("cpu"))
    assert again == bundle.metrics

    # And so does predict, the user's path, on the 2000 held-out images saved as PNGs.
    folder = root / "held-out"
    folder.mkdir()
    for i, image in enumerate(dataset.test.images.numpy()):
        Image.fromarray(image).save(folder / f"{i:05d}.png")
    out = cli("predict", str(path), str(folder), "--top-k", "1", "--csv", "all.csv", cwd=root)
    assert out.returncode == 0, shown(out)
    with (root / "all.csv").open(encoding="utf-8") as fh:
        top1 = [int(row["class"]) for row in csv.DictReader(fh)]
    labels = dataset.test.labels.tolist()
    correct = sum(p == t for p, t in zip(top1, labels, strict=True))
    assert correct == round(bundle.metrics["test/acc"] * 2000)


def test_predict_reads_resized_and_inverted_pngs(trained: tuple[Path, Path, str]) -> None:
    """100 held-out images as PNG files: a third at 28x28, a third resized to 64x64, a third
    inverted to black on white (half of those at 64x64 too); >= 95% get their label."""
    root, path, _ = trained
    bundle = read_bundle(path)
    test = load_dataset(OmegaConf.create(bundle.config).data).test
    folder = root / "mixed"
    folder.mkdir()
    picks = np.arange(100) * 20  # spread over the held-out part (stored by class)
    expected, inverted = {}, {}
    for n, i in enumerate(picks):
        image = Image.fromarray(test.images[i].numpy())
        if n % 3 == 1 or n % 6 == 5:
            image = image.resize((64, 64), Image.Resampling.BILINEAR)
        if n % 3 == 2:
            image = Image.fromarray(255 - np.asarray(image))
        name = f"img{n:03d}.png"
        image.save(folder / name)
        expected[name], inverted[name] = KMNIST_CLASSES[int(test.labels[i])], n % 3 == 2
    out = cli("predict", str(path), str(folder), "--top-k", "3", "--csv", "p.csv", cwd=root)
    assert out.returncode == 0, shown(out)
    lines = out.stdout.splitlines()
    assert len(lines) == 100
    assert all(re.fullmatch(r"\S+(  \S [01]\.\d{3}){3}(  \[inverted\])?", ln) for ln in lines)
    with (root / "p.csv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 300
    by_image: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_image.setdefault(Path(row["image"]).name, []).append(row)
    assert sorted(by_image) == sorted(expected)
    for name, ranked in by_image.items():
        assert [r["rank"] for r in ranked] == ["1", "2", "3"]
        probs = [float(r["probability"]) for r in ranked]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert all(KMNIST_CLASSES[int(r["class"])] == r["character"] for r in ranked)
        assert bool(int(ranked[0]["inverted"])) == inverted[name]
    hits = sum(by_image[name][0]["character"] == char for name, char in expected.items())
    print(f"predict: {hits}/100 held-out PNGs get their label")  # shown with pytest -s
    assert hits >= 95


# Held-out images as users have them (benchmarks/predict_presentations.py measures each at
# full size for docs/predict.md): each set of 50 must be read as well as plain PNGs are.
PRESENTED = 50
# EXIF orientation, and the turn that stores an upright picture so that a viewer applying
# the orientation shows it upright
SIDEWAYS = [(6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270)]
# Address space for data (RLIMIT_DATA) the strip is read in: less than the 1.6 GB that a
# 40000x40000 square takes alone, and more than predict needs (its libraries, the model,
# the 80 MB strip and a few copies of it).
STRIP_DATA_LIMIT = 1536 * 2**20


def held_out(path: Path, count: int) -> list[tuple[Image.Image, str]]:
    """`count` held-out images (white on black, 28x28) spread over the classes, and their
    characters."""
    test = load_dataset(OmegaConf.create(read_bundle(path).config).data).test
    picks = np.linspace(0, len(test.labels) - 1, count).astype(int)
    return [
        (Image.fromarray(test.images[i].numpy()), KMNIST_CLASSES[int(test.labels[i])])
        for i in picks
    ]


def top1(root: Path, path: Path, folder: Path) -> tuple[dict[str, str], str]:
    """({image name: predicted character}, stderr) of `predict --top-k 1` on the folder."""
    out = cli("predict", str(path), str(folder), "--top-k", "1", cwd=root)
    assert out.returncode == 0, shown(out)
    found = dict(line.split("  ")[:2] for line in out.stdout.splitlines())
    return {Path(k).name: v.split()[0] for k, v in found.items()}, out.stderr


def on_paper(image: Image.Image, size: int) -> Image.Image:
    """A white-on-black character as dark ink on tinted paper, RGB, `size` pixels square."""
    ink = np.asarray(image.resize((size, size), Image.Resampling.BILINEAR), dtype=float) / 255
    paper, dark = np.array([236, 226, 196]), np.array([40, 34, 60])
    rgb = (1 - ink[..., None]) * paper + ink[..., None] * dark
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def test_predict_reads_phone_jpegs_upright_by_their_exif_orientation(
    trained: tuple[Path, Path, str],
) -> None:
    """Photos stored sideways with EXIF orientation 6 or 8, as phones write them."""
    root, path, _ = trained
    folder = root / "sideways"
    folder.mkdir()
    expected = {}
    for n, (image, char) in enumerate(held_out(path, PRESENTED)):
        orientation, turn = [(6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270)][
            n % 2
        ]
        exif = Image.Exif()
        exif[0x0112] = orientation  # Orientation: how a viewer turns the stored pixels
        stored = on_paper(image, 112).transpose(turn)
        stored.save(folder / f"p{n:03d}.jpg", quality=90, exif=exif)
        expected[f"p{n:03d}.jpg"] = char
    got, _ = top1(root, path, folder)
    hits = sum(got[name] == char for name, char in expected.items())
    assert hits >= 0.9 * PRESENTED, f"{hits}/{PRESENTED}"


def test_predict_frames_a_character_with_margins_like_the_training_images(
    trained: tuple[Path, Path, str],
) -> None:
    """A crop of a page: the character a third of the page's height, off centre, margins
    around it, as a scan is cropped by hand."""
    root, path, _ = trained
    folder = root / "margins"
    folder.mkdir()
    expected = {}
    for n, (image, char) in enumerate(held_out(path, PRESENTED)):
        page = Image.new("RGB", (320, 240), (236, 226, 196))
        page.paste(on_paper(image, 80), (190 - 3 * n, 40 + n))
        page.save(folder / f"m{n:03d}.png")
        expected[f"m{n:03d}.png"] = char
    got, _ = top1(root, path, folder)
    hits = sum(got[name] == char for name, char in expected.items())
    assert hits >= 0.9 * PRESENTED, f"{hits}/{PRESENTED}"


def test_predict_shows_white_ink_on_transparency_and_warns_of_blank_images(
    trained: tuple[Path, Path, str],
) -> None:
    root, path, _ = trained
    folder = root / "transparent"
    folder.mkdir()
    expected = {}
    for n, (image, char) in enumerate(held_out(path, PRESENTED)):
        rgba = Image.new("RGBA", image.size, (255, 255, 255, 0))
        rgba.putalpha(image)  # white ink, opaque where the character is
        rgba.save(folder / f"t{n:03d}.png")
        expected[f"t{n:03d}.png"] = char
    Image.new("RGBA", (40, 40), (255, 255, 255, 0)).save(folder / "zz-empty.png")
    got, stderr = top1(root, path, folder)
    hits = sum(got[name] == char for name, char in expected.items())
    assert hits >= 0.9 * PRESENTED, f"{hits}/{PRESENTED}"
    warnings = [line for line in stderr.splitlines() if "warning" in line]
    assert warnings == [
        f"kmnist_sweep: warning: {folder / 'zz-empty.png'}: a blank image (no ink stands "
        "out from its paper): its characters are guesses"
    ]


def test_predict_reads_a_long_strip_without_padding_it_square(
    trained: tuple[Path, Path, str],
) -> None:
    """A 40000x2000 strip with one character near its left end is read, and read within
    less memory than a 40000x40000 square takes; a strip over the pixel limit is one line."""
    root, path, _ = trained
    (image, char), *_ = held_out(path, 1)
    strip = Image.new("L", (40000, 2000), 255)
    strip.paste(ImageOps.invert(image.resize((1800, 1800), Image.Resampling.BILINEAR)), (300, 100))
    strip.save(root / "strip.png")
    del strip
    Image.new("L", (60000, 2000), 255).save(root / "longer.png")
    out = subprocess.run(
        [sys.executable, "-m", "kmnist_sweep", "predict", str(path), "strip.png"],
        cwd=root,
        env=CLI_ENV,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=lambda: resource.setrlimit(
            resource.RLIMIT_DATA, (STRIP_DATA_LIMIT, STRIP_DATA_LIMIT)
        ),
    )
    assert out.returncode == 0, shown(out)
    assert out.stdout.split()[1] == char, out.stdout
    refused = cli("predict", str(path), "longer.png", cwd=root)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr == (
        "kmnist_sweep: error: longer.png: 60000x2000 pixels, more than predict reads "
        "(89 megapixels); crop it to the character\n"
    )
