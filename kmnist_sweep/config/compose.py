"""Composing the config: where conf/ is, and Hydra's composition errors as one line.

`conf/` ships inside the package (kmnist_sweep/conf, also reached as the top-level conf/ of
a checkout), so an installed package finds its configs from any working folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig

from kmnist_sweep.errors import UserError
from kmnist_sweep.files import check_writable_dir

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def preflight(args: list[str]) -> None:
    """Compose the config once before Hydra does, so that an unknown group, option or key is
    one line and exit status 2 rather than Hydra's multi-line report and status 1."""
    from omegaconf.errors import OmegaConfBaseException

    if any(a.startswith("-") for a in args):
        return  # --help, --cfg, -m ...: Hydra's own business
    try:
        cfg = compose_config(args, hydra_config=True)
        # Hydra makes its run folder before our code runs; a read-only disk would be its
        # traceback, not our line.
        run_dir = str(cfg.hydra.run.dir)
        check_writable_dir(Path(run_dir), f"hydra.run.dir={run_dir!r} cannot be created")
    except OmegaConfBaseException as exc:
        print(f"kmnist_sweep: error: {one_line(exc, args)}", file=sys.stderr, flush=True)
        sys.exit(2)
    except UserError as exc:
        print(f"kmnist_sweep: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)


def compose_config(args: list[str], hydra_config: bool = False) -> DictConfig:
    """The config composed from command-line overrides (`hydra.*` ones left to Hydra); a
    composition error (unknown group, option or key, bad syntax) is a one-line UserError."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = [a for a in args if not a.lstrip("+~").startswith("hydra.")]
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(
                config_name="config", overrides=overrides, return_hydra_config=hydra_config
            )
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise UserError(one_line(exc, overrides)) from None


def one_line(exc: BaseException, overrides: list[str]) -> str:
    """Hydra's composition error as one line: the problem, and the options where it lists them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if "Config search path:" in lines:
        lines = lines[: lines.index("Config search path:")]
    text: list[str] = []
    options: list[str] = []
    for line in lines:
        if line.startswith("Available options in"):
            if text:
                text[-1] += ";"
            text.append(line.rstrip(":").replace("Available options", "available options") + ":")
        elif text and text[-1].endswith(":") and "available options" in text[-1]:
            options.append(line)
        else:
            text.append(line)
    message = " ".join(text) + (" " + ", ".join(options) if options else "")
    if isinstance(exc, OverrideParseException):
        parser = OverridesParser.create()
        for override in overrides:
            try:
                parser.parse_overrides([override])
            except OverrideParseException:
                return f"cannot parse override {override!r}: {lines[0]}"
    return message
