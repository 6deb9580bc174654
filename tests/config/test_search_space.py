"""Search spaces: every sweep file composes and validates; bad spaces fail on one clear line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from kmnist_sweep.config.search_space import (
    Param,
    apply_params,
    optuna_name,
    parse_space,
    pow2_exponents,
    to_overrides,
)
from kmnist_sweep.errors import ConfigError
from kmnist_sweep.sweep.study import config_point

REPO = Path(__file__).resolve().parents[2]
SWEEPS = sorted(p.stem for p in (REPO / "conf" / "sweep").glob("*.yaml"))


def test_all_sweep_files_are_found() -> None:
    assert {"batchsize", "lr", "epochs", "full"} <= set(SWEEPS)


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_file_composes_and_its_space_validates(compose_cfg: Any, name: str) -> None:
    cfg = compose_cfg(f"+sweep={name}", "data=kmnist_sample")
    params = parse_space(cfg.search_space, cfg)
    assert params, f"conf/sweep/{name}.yaml has an empty search_space"
    resolved = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert isinstance(resolved, dict)
    study = resolved["study"]
    assert study["name"].endswith("kmnist_sample") and study["name"] != "kmnist_sample-default"
    assert study["storage"] == f"sqlite:///storage/{study['name']}.db"
    assert study["output_dir"] == f"sweeps/{study['name']}"
    assert study["metric"] == "val/acc"
    if study["budget"] is None:  # with a budget, n_trials is only an upper bound
        assert 1 <= study["n_trials"] <= 20  # small enough to try on CPU
    for p in params:  # every value the space can produce is accepted by the config
        apply_params(cfg, {p.name: _some_value(p)})


def _some_value(p: Param) -> Any:
    if p.type == "categorical":
        return p.choices[-1]
    if p.type == "pow2":
        return int(p.high)
    if p.type == "lr_finder":
        return 1e-3
    return p.high


def test_batchsize_sweep_searches_powers_of_two(compose_cfg: Any) -> None:
    cfg = compose_cfg("+sweep=batchsize")
    param, lr = parse_space(cfg.search_space, cfg)
    assert param == Param("trainer.batch_size", "pow2", low=32, high=2048)
    # Each size trains at the LR finder's LR for it: seeded, not searched.
    assert lr.name == "trainer.lr" and lr.type == "lr_finder" and not lr.searched
    assert pow2_exponents(param) == (5, 11)
    assert optuna_name(param) == "trainer.batch_size.log2"  # the sampler sees the exponent


def test_full_sweep_covers_the_issue_keys(compose_cfg: Any) -> None:
    cfg = compose_cfg("+sweep=full")
    names = {p.name for p in parse_space(cfg.search_space, cfg)}
    assert names == {
        "trainer.batch_size",
        "trainer.lr",
        "trainer.epochs",
        "model.arch",
        "model.stem",
        "trainer.weight_decay",
        "trainer.label_smoothing",
    }


@pytest.mark.parametrize("name", ["full", "full_cpu"])
def test_the_full_sweeps_start_from_the_defaults_all_inside_their_space(
    compose_cfg: Any, name: str
) -> None:
    """The shipped defaults are a point of both full spaces, so trial 0 is the single run."""
    cfg = compose_cfg(f"+sweep={name}")
    params = parse_space(cfg.search_space, cfg)
    assert cfg.study.start_from_defaults
    point, outside = config_point(params, cfg)
    assert outside == []
    assert point["trainer.batch_size.log2"] == cfg.trainer.batch_size.bit_length() - 1
    for p in params:
        if p.type != "pow2":
            assert point[p.name] == OmegaConf.select(cfg, p.name), p.name
            # the type the suggest call returns: an int epoch, a float smoothing
            assert type(point[p.name]) is {"int": int, "float": float}.get(p.type, str), p.name


def test_config_point_leaves_values_outside_the_space_to_the_sampler(compose_cfg: Any) -> None:
    cfg = compose_cfg("trainer.lr=0.9", "trainer.batch_size=32", "trainer.epochs=7")
    params = [
        Param("trainer.lr", "float", low=1e-3, high=0.5, log=True),  # 0.9: above
        Param("trainer.batch_size", "pow2", low=64, high=256),  # 32: below
        Param("trainer.epochs", "int", low=4, high=12, step=2),  # 7: off the grid
        Param("model.arch", "categorical", choices=("resnet18", "resnet34")),
        Param("lr", "lr_finder", low_factor=0.1, high_factor=10),  # the finder's LR: 1x
    ]
    point, outside = config_point(params, cfg)
    assert outside == ["trainer.lr", "trainer.batch_size", "trainer.epochs"]
    assert point == {"model.arch": "resnet18", "lr.factor": 1.0}
    point, outside = config_point(params[1:3], compose_cfg("trainer.epochs=8"))
    assert point == {"trainer.batch_size.log2": 6, "trainer.epochs": 8} and outside == []


def test_config_point_matches_values_by_type_and_grid_tolerance(compose_cfg: Any) -> None:
    cfg = compose_cfg("trainer.label_smoothing=0", "trainer.epochs=7", "trainer.cutout=0")
    params = [
        Param("trainer.label_smoothing", "float", low=-0.3, high=0.3, step=0.1),  # 0 on the grid
        Param("trainer.epochs", "categorical", choices=(7.0, True)),  # 7 is neither 7.0 nor True
        Param("trainer.cutout", "categorical", choices=(False, 0)),  # 0, not False
    ]
    point, outside = config_point(params, cfg)
    assert outside == ["trainer.epochs"]
    assert point == {"trainer.label_smoothing": 0.0, "trainer.cutout": 0}
    assert type(point["trainer.label_smoothing"]) is float and type(point["trainer.cutout"]) is int


def test_default_config_has_an_empty_space_and_a_default_study(compose_cfg: Any) -> None:
    cfg = compose_cfg()
    assert parse_space(cfg.search_space, cfg) == []
    assert cfg.study.name == "kmnist-default"
    assert cfg.study.storage == "sqlite:///storage/kmnist-default.db"
    assert cfg.study.pruner.max_resource == cfg.trainer.epochs


def test_a_range_can_be_narrowed_from_the_command_line(compose_cfg: Any) -> None:
    cfg = compose_cfg("+sweep=batchsize", "++search_space.trainer.batch_size.high=512")
    param, _ = parse_space(cfg.search_space, cfg)
    assert (param.type, param.low, param.high) == ("pow2", 32, 512)
    # ... and a key taken out of the sweep with null.
    cfg = compose_cfg("+sweep=batchsize", "++search_space.trainer.lr=null")
    assert [p.name for p in parse_space(cfg.search_space, cfg)] == ["trainer.batch_size"]


BAD_SPACES = {
    "unknown type": (
        {"trainer.lr": {"type": "flaot", "low": 1e-4, "high": 0.1}},
        "search_space.trainer.lr: unknown type 'flaot' (did you mean 'float'?)",
    ),
    "low > high": (
        {"trainer.lr": {"type": "float", "low": 0.1, "high": 1e-4}},
        "search_space.trainer.lr: low > high",
    ),
    "log with low 0": (
        {"trainer.lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}},
        "search_space.trainer.lr: log scale needs low > 0",
    ),
    "log with negative low": (
        {"trainer.weight_decay": {"type": "float", "low": -1.0, "high": 0.1, "log": True}},
        "search_space.trainer.weight_decay: log scale needs low > 0",
    ),
    "pow2 bound 48": (
        {"trainer.batch_size": {"type": "pow2", "low": 48, "high": 2048}},
        "search_space.trainer.batch_size: pow2 bounds must be powers of two, got low=48",
    ),
    "pow2 bound 1000": (
        {"trainer.batch_size": {"type": "pow2", "low": 32, "high": 1000}},
        "pow2 bounds must be powers of two, got high=1000",
    ),
    "epochs above 30": (
        {"trainer.epochs": {"type": "int", "low": 1, "high": 31}},
        "search_space.trainer.epochs: epochs must be integers in 0..30, got 31",
    ),
    "epochs below 0": (
        {"trainer.epochs": {"type": "int", "low": -1, "high": 3}},
        "epochs must be integers in 0..30, got -1",
    ),
    "epochs as float": (
        {"trainer.epochs": {"type": "float", "low": 1, "high": 3}},
        "search_space.trainer.epochs: epochs must be type int or categorical",
    ),
    "no choices": (
        {"model.arch": {"type": "categorical", "choices": []}},
        "search_space.model.arch: categorical needs a non-empty list of choices",
    ),
    "misspelled field": (
        {"trainer.lr": {"type": "float", "low": 1e-4, "hihg": 0.1}},
        "search_space.trainer.lr: unknown field 'hihg' (did you mean 'high'?)",
    ),
    "field of another type": (
        {"trainer.lr": {"type": "float", "low": 1e-4, "high": 0.1, "choices": [1]}},
        "unknown field 'choices' for type float",
    ),
    "missing bound": (
        {"trainer.lr": {"type": "float", "low": 1e-4}},
        "search_space.trainer.lr: type float needs 'high'",
    ),
    "missing type": (
        {"trainer.lr": {"low": 1e-4, "high": 0.1}},
        "search_space.trainer.lr: missing 'type'",
    ),
    "unknown key": (
        {"trainer.lrr": {"type": "float", "low": 1e-4, "high": 0.1}},
        "search_space.trainer.lrr: no such config key (did you mean 'trainer.lr'?)",
    ),
    "a section, not a value": (
        {"trainer": {"type": "float", "low": 1e-4, "high": 0.1}},
        "search_space.trainer: names a config section",
    ),
    "batch size not pow2": (
        {"trainer.batch_size": {"type": "int", "low": 32, "high": 256}},
        "search_space.trainer.batch_size: batch size must be searched with type pow2",
    ),
    "lr_finder factors": (
        {"trainer.lr": {"type": "lr_finder", "low_factor": 2, "high_factor": 10}},
        "lr_finder needs 0 < low_factor < 1 < high_factor",
    ),
    "study keys": (
        {"study.n_trials": {"type": "int", "low": 1, "high": 3}},
        "search_space.study.n_trials: study.* keys cannot be searched",
    ),
    "int bound not integral": (
        {"trainer.epochs": {"type": "int", "low": 1.5, "high": 3}},
        "'low' must be an integer",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_SPACES))
def test_malformed_space_gives_one_clear_line(compose_cfg: Any, case: str) -> None:
    space, message = BAD_SPACES[case]
    with pytest.raises(ConfigError) as info:
        parse_space(space, compose_cfg())
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_lr_finder_type_parses() -> None:
    (param,) = parse_space(
        {"trainer.lr": {"type": "lr_finder", "low_factor": 0.1, "high_factor": 10}}
    )
    assert param == Param("trainer.lr", "lr_finder", low_factor=0.1, high_factor=10.0)


def test_nested_keys_parse_like_dotted_ones() -> None:
    nested = parse_space(
        {"trainer": {"lr": {"type": "float", "low": 1e-4, "high": 0.1, "log": True}}}
    )
    dotted = parse_space({"trainer.lr": {"type": "float", "low": 1e-4, "high": 0.1, "log": True}})
    assert nested == dotted


def test_apply_params_returns_a_copy(compose_cfg: Any) -> None:
    cfg = compose_cfg()
    out = apply_params(cfg, {"trainer.batch_size": 512, "model.arch": "resnet50"})
    assert (out.trainer.batch_size, out.model.arch) == (512, "resnet50")
    assert (cfg.trainer.batch_size, cfg.model.arch) == (64, "resnet18")
    assert out.study.name == "kmnist-default"  # interpolations still live
    with pytest.raises(ConfigError, match="trainer.bacth_size: no such config key"):
        apply_params(cfg, {"trainer.bacth_size": 512})


@pytest.mark.parametrize(
    "value", [0.003, 1e-05, 3, "resnet18", True, None, "true", "12", "a b", "it's", -0.5]
)
def test_overrides_read_back_as_the_same_value(value: Any) -> None:
    (text,) = to_overrides({"trainer.x": value})
    (override,) = OverridesParser.create().parse_overrides([text])
    assert override.key_or_group == "trainer.x"
    assert override.value() == value and type(override.value()) is type(value)


def test_to_overrides_keeps_order() -> None:
    assert to_overrides({"trainer.lr": 0.003, "trainer.batch_size": 256}) == [
        "trainer.lr=0.003",
        "trainer.batch_size=256",
    ]
