"""The config schema (kmnist_sweep/config/schema.py) against conf/: every key declared once,
every sweep and group option composing and passing the one check pass."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from kmnist_sweep.config.check import check_config
from kmnist_sweep.config.compose import CONF_DIR
from kmnist_sweep.config.reference import COMMAND, PAGE, reference
from kmnist_sweep.config.schema import FREE_FORM, SCHEMA
from kmnist_sweep.errors import ConfigError

CONF = Path(CONF_DIR)
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "sweep")
SWEEPS = sorted(p.stem for p in (CONF / "sweep").glob("*.yaml"))


def leaves(tree: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if key == "defaults" or name.split(".")[0] in FREE_FORM:
            continue
        if isinstance(value, dict) and value and name not in DICT_VALUED:
            keys += leaves(value, f"{name}.")
        else:
            keys.append(name)
    return keys


DICT_VALUED = {"launcher.additional_parameters", "debug.inject_oom"}


def conf_keys() -> dict[str, list[Path]]:
    """Every key some file of conf/ sets -> the files setting it."""
    found: dict[str, list[Path]] = {}
    for path in sorted(CONF.rglob("*.yaml")):
        tree = yaml.safe_load(path.read_text()) or {}
        group = path.parent.name
        prefix = "" if path.parent == CONF or group == "sweep" else f"{group}."
        for key in leaves(tree, prefix):
            found.setdefault(key, []).append(path)
    return found


def compose_cfg(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_every_conf_key_has_exactly_one_declaration() -> None:
    undeclared = sorted(set(conf_keys()) - set(SCHEMA))
    assert undeclared == []


def test_every_declaration_is_used_by_conf() -> None:
    unused = sorted(set(SCHEMA) - set(conf_keys()))
    assert unused == []


def test_every_declaration_has_a_unit_and_says_what_it_accepts() -> None:
    for key, rule in SCHEMA.items():
        assert rule.unit and rule.describe(), key


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_option_composes_and_checks(group: str) -> None:
    for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
        check_config(compose_cfg(f"{group}={option}"))


@pytest.mark.parametrize("sweep", SWEEPS)
@pytest.mark.parametrize("data", ["kmnist", "k49", "kkanji", "kmnist_sample", "synthetic"])
def test_every_sweep_composes_and_checks(sweep: str, data: str) -> None:
    params = check_config(compose_cfg(f"+sweep={sweep}", f"data={data}"))
    assert params, f"+sweep={sweep} searches nothing"


@pytest.mark.parametrize(
    "override, message",
    [
        ("lr_finder.num_it=0", "lr_finder.num_it=0 is not a whole number >= 10"),
        ("lr_finder.end_lr=1e-8", "lr_finder.end_lr=1e-08 must be above lr_finder.start_lr=1e-07"),
        ("data.valid_fraction=1.5", "data.valid_fraction=1.5 is not a number in (0, 1)"),
        ("tracking.mode=loud", "tracking.mode='loud' is not one of online, offline, disabled"),
        (
            "trainer.channels_last=maybe",
            "trainer.channels_last='maybe' is not auto, true or false",
        ),
        (
            "batch_size.min=512",
            "trainer.batch_size=64 is outside batch_size.min=512 .. batch_size.max=4096",
        ),
        ("+trainer.lr_max=0.1", "trainer.lr_max: no such config key (did you mean 'trainer.lr'?)"),
        ("debug.inject_oom=5", "debug.inject_oom=5 is not a mapping {above: images, epoch, step}"),
        (
            "debug.inject_oom={above: 64, step: 0}",
            "debug.inject_oom.step=0 is not a whole number >= 1 or null",
        ),
        (
            "debug.inject_oom={abve: 64}",
            "debug.inject_oom.abve: no such key (one of above, epoch, step)",
        ),
        (  # a test switch under the user's group it sat in before the debug group
            "+launcher.executor=local",
            "launcher.executor: no such config key (did you mean 'debug.executor'?)",
        ),
        (
            "+debug.objectve=a:b",
            "debug.objectve: no such config key (did you mean 'debug.objective'?)",
        ),
    ],
)
def test_bad_values_are_one_line_config_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_config(compose_cfg("+sweep=lr", "data=synthetic", override))
    assert str(info.value) == message


def test_the_lr_finder_range_is_checked_through_the_cli(tmp_path: Path) -> None:
    """`+sweep=lr lr_finder.num_it=0` was accepted and resumed the study; now it is refused
    before any study exists."""
    import subprocess
    import sys

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "kmnist_sweep",
            "+sweep=lr",
            "data=synthetic",
            "lr_finder.num_it=0",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "kmnist_sweep: error: lr_finder.num_it=0 is not a whole number >= 10"
    )
    assert not (tmp_path / "storage").exists()


def test_the_configuration_reference_is_current() -> None:
    """docs/reference/config.md is what `python -m kmnist_sweep.config.reference` writes from
    conf/ and the schema: a key, default or comment changed without it fails here."""
    page = CONF.parents[1] / PAGE
    assert page.read_text(encoding="utf-8") == reference(), f"stale: run {COMMAND}"


def test_a_key_without_a_comment_or_a_schema_row_fails_the_reference(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    trainer = conf / "trainer" / "default.yaml"
    original = trainer.read_text()
    trainer.write_text(original + "warmup_epochs: 1        # epochs of linear warm-up\n")
    with pytest.raises(ValueError, match=r"trainer\.warmup_epochs has no row in config/schema"):
        reference(conf)
    bare = re.sub(r"^(lr: 0\.07) +#.*$", r"\1", original, flags=re.M)
    assert bare != original
    trainer.write_text(bare)
    with pytest.raises(ValueError, match=r"trainer\.lr has no comment"):
        reference(conf)


def test_conf_lines_fit_in_100_columns() -> None:
    """A comment that does not fit goes on in comment lines indented under its key."""
    long = [
        f"{path.relative_to(CONF)}:{n}"
        for path in sorted(CONF.rglob("*.yaml"))
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if len(line) > 100
    ]
    assert long == []
