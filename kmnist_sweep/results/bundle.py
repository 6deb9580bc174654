"""Model bundles: the one file `final` writes and `predict` reads.

    model-trial3.zip
      bundle.json   what the model is: format version, class map (index -> character), input
                    size, normalisation and test-time views, the composed config (secrets
                    masked), the data's name, note and file md5s, the test metrics, package
                    versions, git commit
      weights.pt    the model's state_dict (torch.save; read back with weights_only=True, so
                    a bundle can carry tensors and nothing that runs code)

A zip, so that `unzip -p model.zip bundle.json` shows what a model is without Python. A
bundle of another format version is refused with one line: its fields may mean other things.
"""

from __future__ import annotations

import datetime
import io
import json
import subprocess
import warnings
import zipfile
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

import kmnist_sweep
from kmnist_sweep.config.schema import TEST_VIEW_COUNTS
from kmnist_sweep.data.download import md5_of
from kmnist_sweep.errors import UserError, error_line
from kmnist_sweep.files import write_atomic
from kmnist_sweep.masking import scrub
from kmnist_sweep.train.model import build_model

FORMAT = "kmnist_sweep-model"
FORMAT_VERSION = 2  # bump when a field changes meaning; read_bundle refuses any other
# Formats this version reads. 1 had no test-time views: its test metrics are of one view
# each. 2 adds `views`, so a reader that drops it (format 1 code) refuses the bundle rather
# than predicting with fewer views than its stored metrics were measured with.
READS = (1, 2)
BUNDLE_JSON = "bundle.json"
WEIGHTS = "weights.pt"
PACKAGES = ("torch", "torchvision", "fastai", "optuna", "kmnist_sweep")
# What read_bundle insists on before anything uses a field.
FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "classes": list,
    "image_size": int,
    "mean": (int, float),
    "std": (int, float),
    "config": dict,
    "data": dict,
    "source": dict,
    "metrics": dict,
}
# What a bundle can hold: bundle.json is kilobytes; ResNet-50's weights for the 3832
# Kuzushiji-Kanji classes are about 120 MB; the models read 28x28 or 64x64 images.
MAX_JSON_BYTES = 64 * 2**20
MAX_WEIGHT_BYTES = 2 * 2**30
MAX_IMAGE_SIZE = 1024  # pixels per side
GIT_TIMEOUT_S = 10  # seconds: a git that hangs (network file system) costs no more


@dataclass(frozen=True)
class Bundle:
    """A trained model and everything needed to use it again or to tell where it came from."""

    classes: list[str]  # index -> character (the dataset's class map)
    image_size: int  # pixels per side of the model's input
    mean: float  # training pixels' mean, as a fraction of 255 (inputs are (x - mean) / std)
    std: float  # training pixels' standard deviation, as a fraction of 255
    config: dict[str, Any]  # the composed config it was trained with, secrets masked
    data: dict[str, Any]  # name, note, files: {file name: md5} of the files read
    source: dict[str, Any]  # study, trial, its validation metric and value
    views: int = 1  # test-time views averaged per image (train/views.py); 1 in older bundles
    metrics: dict[str, float] = field(default_factory=dict)  # test/loss, acc, bacc, images
    versions: dict[str, str] = field(default_factory=dict)  # package -> version
    git_commit: str | None = None  # of the kmnist_sweep checkout, when it is one
    created: str = ""  # ISO 8601, UTC
    state: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # the weights

    def with_metrics(self, metrics: dict[str, float]) -> Bundle:
        return replace(self, metrics=dict(metrics))


def make_bundle(
    cfg: Any,
    *,
    classes: list[str],
    image_size: int,
    mean: float,
    std: float,
    views: int,
    model: nn.Module,
    data_name: str,
    note: str,
    files: tuple[Path, ...],
    source: dict[str, Any],
) -> Bundle:
    """A bundle of `model` as trained with `cfg` (secrets masked here) on the files read."""
    # Contiguous CPU copies: a channels-last or CUDA tensor would load as such elsewhere.
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    return Bundle(
        classes=list(classes),
        image_size=int(image_size),
        mean=float(mean),
        std=float(std),
        views=int(views),
        config=scrub(cfg),
        data={"name": data_name, "note": note, "files": file_md5s(files)},
        source=dict(source),
        versions=package_versions(),
        git_commit=git_commit(),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        state=state,
    )


def file_md5s(paths: tuple[Path, ...]) -> dict[str, str]:
    return {path.name: md5_of(path) for path in paths}


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:  # a checkout run without installing it
            versions[name] = kmnist_sweep.__version__ if name == "kmnist_sweep" else "unknown"
    return versions


def git_commit() -> str | None:
    """HEAD of the checkout this package runs from, '+dirty' with local changes; None for an
    installed package (even one inside some other repository's tree)."""
    package = Path(kmnist_sweep.__file__).resolve().parent

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(package), *args],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=True,
        )
        return done.stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() / "kmnist_sweep" != package:
            return None
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def write_bundle(path: Path, bundle: Bundle) -> None:
    """The zip at `path`, written atomically (a reader never sees half a bundle)."""
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(bundle)}
    meta.pop("state")
    weights = io.BytesIO()
    torch.save(bundle.state, weights)

    def write(out: Any) -> None:
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(BUNDLE_JSON, json.dumps(meta, indent=1, ensure_ascii=False))
            # Stored, not deflated: float weights barely compress and deflate costs seconds.
            zf.writestr(WEIGHTS, weights.getvalue(), compress_type=zipfile.ZIP_STORED)

    write_atomic(path, write)


def read_bundle(path: Path) -> Bundle:
    """The bundle at `path`; a UserError (one line) for anything else there."""
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a model bundle (the .zip file final writes)")
    if not path.is_file():
        raise UserError(
            f"{path}: no such model bundle (make one with: python -m kmnist_sweep final "
            "sweeps/<study>)"
        )
    raw_meta, raw_weights = _read_entries(path)
    try:
        meta = json.loads(raw_meta.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError too
        raise UserError(
            f"{path}: damaged model bundle ({BUNDLE_JSON}: {error_line(exc)})"
        ) from None
    _check_format(path, meta)
    if raw_weights is None:
        raise UserError(f"{path}: damaged model bundle (no {WEIGHTS})")
    try:
        with warnings.catch_warnings():  # torch warns of odd pickles in lines of its own
            warnings.simplefilter("ignore")
            state = torch.load(io.BytesIO(raw_weights), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors alike mean "not our weights"
        raise UserError(f"{path}: damaged model bundle ({WEIGHTS}: {error_line(exc)})") from None
    fields = {k: meta[k] for k in Bundle.__dataclass_fields__ if k in meta and k != "state"}
    if meta["format_version"] == 1:
        fields["views"] = 1
    wrong = _wrong_fields(fields)
    if wrong or not isinstance(state, dict):
        what = f"{', '.join(wrong)} missing or of the wrong type" if wrong else WEIGHTS
        raise UserError(f"{path}: damaged model bundle ({BUNDLE_JSON}: {what})")
    return Bundle(**fields, state=state)


def _read_entries(path: Path) -> tuple[bytes, bytes | None]:
    """(bundle.json, weights.pt or None) as stored in the zip at `path`. Any error of the
    zip or its compression is a UserError; so is an entry larger than a bundle holds (its
    size is the zip's word, and reading stops there)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if BUNDLE_JSON not in names:
                raise UserError(f"{path}: not a kmnist_sweep model bundle (no {BUNDLE_JSON})")
            for name, limit in ((BUNDLE_JSON, MAX_JSON_BYTES), (WEIGHTS, MAX_WEIGHT_BYTES)):
                if name in names and zf.getinfo(name).file_size > limit:
                    raise UserError(
                        f"{path}: damaged model bundle ({name} is "
                        f"{zf.getinfo(name).file_size} bytes, more than a bundle holds)"
                    )
            meta = zf.read(BUNDLE_JSON)
            return meta, zf.read(WEIGHTS) if WEIGHTS in names else None
    except UserError:
        raise
    except Exception as exc:  # zipfile's, zlib's, bz2's and lzma's errors alike
        raise UserError(
            f"{path}: not a kmnist_sweep model bundle ({error_line(exc, typed=False)})"
        ) from None


def _wrong_fields(fields: dict[str, Any]) -> list[str]:
    """The fields of bundle.json that are missing or that no bundle could hold."""
    wrong = [k for k, kind in FIELD_TYPES.items() if not isinstance(fields.get(k), kind)]
    views = fields.get("views")
    if type(views) is not int or views not in TEST_VIEW_COUNTS:  # not 5.0, not true
        wrong.append("views")
    size, classes, config = fields.get("image_size"), fields.get("classes"), fields.get("config")
    if "image_size" not in wrong and not (type(size) is int and 1 <= size <= MAX_IMAGE_SIZE):
        wrong.append("image_size")
    if isinstance(classes, list) and not all(isinstance(c, str) for c in classes):
        wrong.append("classes")
    if isinstance(config, dict) and not isinstance(config.get("model", {}), dict):
        wrong.append("config")
    return wrong


def _check_format(path: Path, meta: Any) -> None:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{path}: not a kmnist_sweep model bundle ({BUNDLE_JSON} has no format)")
    version = meta.get("format_version")
    if version not in READS or isinstance(version, bool):
        versions = meta.get("versions")
        made_by = versions.get("kmnist_sweep") if isinstance(versions, dict) else None
        raise UserError(
            f"{path}: model bundle format {version!r} (written by kmnist_sweep "
            f"{made_by or 'of another version'}); "
            f"this kmnist_sweep reads formats {', '.join(map(str, READS))}: use the version that "
            "wrote it, or run final again"
        )


def load_model(bundle: Bundle, path: Path, device: torch.device) -> nn.Module:
    """The bundle's network with its weights, in eval mode on `device`. A class map, config
    and weights that do not fit each other (the model of one dataset, the characters of
    another) is a UserError naming both."""
    outputs = bundle.state.get("fc.weight")
    n_out = int(outputs.shape[0]) if isinstance(outputs, torch.Tensor) and outputs.dim() else None
    if n_out != len(bundle.classes):
        raise UserError(
            f"{path}: the class map has {len(bundle.classes)} characters "
            f"({bundle.data.get('name')}) but the weights have {n_out} outputs: the bundle "
            "mixes two datasets' models; run final again"
        )
    named = bundle.config.get("model", {})  # a dict: read_bundle checked it
    try:
        model_cfg = OmegaConf.create(named)
        if "pretrained" in model_cfg:
            model_cfg.pretrained = False  # the bundle's weights replace them: fetch nothing
        # Built without initialising its weights (on the meta device, then given storage):
        # the strict load below overwrites every parameter and buffer with the bundle's.
        with torch.device("meta"):
            model = build_model(model_cfg, len(bundle.classes))
        model = model.to_empty(device="cpu")
        model.load_state_dict(bundle.state)
    except Exception as exc:  # missing config keys, shapes that do not fit
        raise UserError(
            f"{path}: the weights do not fit the model the bundle names "
            f"({named.get('arch')}, {named.get('stem')} stem): {error_line(exc)}"
        ) from None
    return model.to(device).eval()
