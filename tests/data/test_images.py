"""Image files read as the training data looks: grayscale, the dataset's size, white on black."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import kmnist_sweep  # noqa: F401  (torchvision compat first)
from kmnist_sweep.data.download import SAMPLE_DIR
from kmnist_sweep.data.formats import read_idx
from kmnist_sweep.data.framing import is_dark_on_light
from kmnist_sweep.data.images import image_files, read_image
from kmnist_sweep.errors import DataError

IMAGES = read_idx(SAMPLE_DIR / "t10k-images-idx3-ubyte.gz")  # (10000, 28, 28) uint8


def save(array: np.ndarray, path: Path, mode: str = "L") -> Path:
    Image.fromarray(array).convert(mode).save(path)
    return path


def test_no_training_image_counts_as_dark_on_light() -> None:
    """All 10k official test images are white ink on black: none would be inverted."""
    flagged = [i for i, image in enumerate(IMAGES) if is_dark_on_light(image)]
    assert flagged == []
    assert all(is_dark_on_light(255 - image) for image in IMAGES[:500])


def test_a_png_of_a_training_image_reads_back_unchanged(tmp_path: Path) -> None:
    framed = read_image(save(IMAGES[7], tmp_path / "a.png"), 28)
    assert not framed.inverted and not framed.blank and framed.pixels.dtype == np.uint8
    assert np.array_equal(framed.pixels, IMAGES[7])


def test_black_on_white_is_inverted_back(tmp_path: Path) -> None:
    framed = read_image(save(255 - IMAGES[3], tmp_path / "b.png"), 28)
    assert framed.inverted and np.array_equal(framed.pixels, IMAGES[3])


@pytest.mark.parametrize("mode, suffix", [("L", ".png"), ("RGB", ".jpg"), ("RGB", ".png")])
def test_other_sizes_and_modes_are_resized_close_to_the_original(
    tmp_path: Path, mode: str, suffix: str
) -> None:
    big = np.asarray(Image.fromarray(IMAGES[11]).resize((64, 64), Image.Resampling.BILINEAR))
    framed = read_image(save(big, tmp_path / f"c{suffix}", mode), 28)
    assert framed.pixels.shape == (28, 28) and not framed.inverted
    error = np.abs(framed.pixels.astype(int) - IMAGES[11].astype(int)).mean()
    assert error < 12  # mean absolute difference, 0-255 grey levels


def test_transparent_background_is_paper(tmp_path: Path) -> None:
    """Black ink on a transparent PNG: composited on white, then inverted like a scan."""
    rgba = np.zeros((28, 28, 4), dtype=np.uint8)
    rgba[..., 3] = IMAGES[5]  # ink where the character is, transparent elsewhere
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    framed = read_image(tmp_path / "t.png", 28)
    assert framed.inverted
    assert np.abs(framed.pixels.astype(int) - IMAGES[5].astype(int)).max() <= 1


def test_a_wide_image_keeps_its_proportions(tmp_path: Path) -> None:
    """Ink across the whole width (two characters side by side) is padded square, not cut."""
    wide = np.concatenate([IMAGES[0], IMAGES[1]], axis=1)  # (28, 56)
    pixels = read_image(save(wide, tmp_path / "w.png"), 28).pixels
    # padded by 7 rows above and below; Lanczos blurs the edge of the character by ~1 row
    assert pixels[:5].max() == 0 and pixels[-5:].max() == 0
    assert pixels[:, 14:].max() > 0 and pixels[:, :14].max() > 0


def test_a_character_with_margins_is_cut_to_its_ink(tmp_path: Path) -> None:
    """A character a third of a wide page's height, off centre, reads as the training image:
    its margins are cut, as the training images have none."""
    page = np.zeros((84, 140), dtype=np.uint8)
    page[10:38, 90:118] = IMAGES[5]  # an image whose ink spans its height, centred across
    framed = read_image(save(page, tmp_path / "m.png"), 28)
    assert np.array_equal(framed.pixels, IMAGES[5])


def test_folders_give_their_images_sorted_and_named_files_as_they_are(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("b.PNG", "a.jpeg", "c.jpg"):
        save(IMAGES[0], folder / name, "RGB")
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub.png").mkdir()
    single = save(IMAGES[1], tmp_path / "one.png")
    found = image_files([folder, single])
    assert found == [folder / "a.jpeg", folder / "b.PNG", folder / "c.jpg", single]


def test_bad_files_and_folders_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello\n")
    (tmp_path / "fake.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    Image.fromarray(IMAGES[0]).save(tmp_path / "a.gif")
    cases = {
        "empty": "empty: no PNG or JPEG images in this folder",
        "nope": "nope: no such file or folder",
    }
    for name, tail in cases.items():
        with pytest.raises(DataError) as info:
            image_files([tmp_path / name])
        assert str(info.value) == f"{tmp_path}/{tail}"
    for name, words in [
        ("notes.txt", "not a readable PNG or JPEG image (cannot identify image file"),
        ("fake.png", "not a readable PNG or JPEG image"),
        ("a.gif", "a GIF image; predict reads PNG or JPEG"),
    ]:
        with pytest.raises(DataError) as info:
            read_image(tmp_path / name, 28)
        message = str(info.value)
        assert "\n" not in message and message.startswith(f"{tmp_path / name}: {words}")
