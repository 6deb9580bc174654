"""Dotted config keys: the leaves of a config tree, and the known key nearest to a typo.

leaf_keys(cfg.trainer, "trainer.")   -> ["trainer.lr", "trainer.epochs", ...]
did_you_mean("trainer.lr_max", keys) -> " (did you mean 'trainer.lr'?)"
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf


def leaf_keys(
    tree: DictConfig | Mapping[Any, Any], prefix: str = "", keep: Collection[str] = ()
) -> list[str]:
    """Every leaf's dotted key, interpolations unresolved; a key in `keep` is a leaf even
    when its value is a mapping (a key whose value is a dict of its own, e.g. SLURM's extra
    parameters)."""
    items: Any = tree
    if isinstance(tree, DictConfig):
        items = OmegaConf.to_container(tree, resolve=False)
    keys = []
    for key, child in items.items():
        name = f"{prefix}{key}"
        if isinstance(child, Mapping) and name not in keep:
            keys += leaf_keys(child, f"{name}.", keep)
        else:
            keys.append(name)
    return keys


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """` (did you mean 'x'?)` for the option closest to `word`, or "" when none is close.
    A dotted key whose last part names exactly one option is that option in another
    section (a key that moved, e.g. launcher.executor -> debug.executor)."""
    options = list(options)
    leaf = word.rsplit(".", 1)[-1]
    moved = [o for o in options if "." in word and o.rsplit(".", 1)[-1] == leaf]
    close = moved if len(moved) == 1 else difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
