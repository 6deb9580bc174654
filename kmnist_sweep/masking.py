"""Secrets out of everything we write: configs, logs, URLs, wandb, model bundles.

scrub(cfg)                 # a plain dict, values under secret-named keys -> ***
scrub_text("postgresql://u:pw@h/db")   # -> "postgresql://u:***@h/db"
mask_url(url)              # the same, for a storage URL shown to the user
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

MASK = "***"

# Key names whose values are secrets. A bare `key`/`..._key` counts, `monkey` does not.
SECRET_KEY = re.compile(r"password|passwd|secret|token|api_?key|(?:^|[_.\-])key$", re.IGNORECASE)
# scheme://user:PASSWORD@host -> scheme://user:***@host (SQLAlchemy URLs, PostgreSQL DSNs).
URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.\-]*://[^/\s:@]*):[^/\s@]*@", re.IGNORECASE)
# ?password=...&token=... in a URL's query string, or password=... in a libpq DSN.
QUERY_SECRET = re.compile(
    r"((?:^|[?&;\s])[^=&#;\s]*(?:password|passwd|secret|token|api_?key)[^=&#;\s]*=)[^&#;\s]*",
    re.IGNORECASE,
)


def scrub(config: Mapping[str, Any]) -> dict[str, Any]:
    """A plain copy of `config` with secret values masked, recursively: values under keys
    that name a secret, and passwords inside URLs anywhere in strings."""
    if isinstance(config, DictConfig):
        config = _to_container(config)
    return {
        str(k): (MASK if SECRET_KEY.search(str(k)) else _scrub_value(v)) for k, v in config.items()
    }


def _scrub_value(value: Any) -> Any:
    if isinstance(value, DictConfig | ListConfig):
        value = _to_container(value)
    if isinstance(value, Mapping):
        return scrub(value)
    if isinstance(value, list | tuple):
        return [_scrub_value(v) for v in value]
    if isinstance(value, str):
        return scrub_text(value)
    return value


def scrub_text(text: str) -> str:
    """`text` with URL passwords, secret query parameters and the W&B API key masked."""
    text = QUERY_SECRET.sub(rf"\1{MASK}", URL_PASSWORD.sub(rf"\1:{MASK}@", text))
    key = os.environ.get("WANDB_API_KEY", "")
    return text.replace(key, MASK) if len(key) >= 8 else text


def _to_container(cfg: DictConfig | ListConfig) -> Any:
    # Interpolations that only resolve inside a Hydra run (${now:...}, ${hydra:...}) must not
    # cost us the whole config: fall back to the unresolved text.
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # any resolver error
        return OmegaConf.to_container(cfg, resolve=False)


def mask_url(url: str) -> str:
    """The URL with its password (and any `password=` query value) replaced by ***."""
    return scrub_text(url)
