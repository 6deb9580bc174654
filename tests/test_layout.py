"""The package's layout rules (docs/design.md), read from the source: layers import only
downwards, no module but the CLI imports another inside a function, no import cycle, no
module above 400 lines, and only the adapters touch what they own (Optuna's private API,
wandb, optuna.Trial)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import run_cli

PACKAGE = Path(__file__).resolve().parents[1] / "kmnist_sweep"

# Lower rank = lower layer. A module may import modules of a lower rank, and modules of its
# own rank inside its own folder; never a higher one.
RANKS = {
    "compat": 0,
    "errors": 0,
    "masking": 0,
    "files": 0,
    "trial_attrs": 0,
    "config": 1,
    "data": 2,
    "train": 3,
    "results": 4,
    "sweep": 5,
    "cli": 6,
    "__main__": 7,
    "__init__": 0,
}
MAX_LINES = 400
# The CLI imports a command's layers when that command runs, so that bad input is answered
# before fastai is loaded (test_bad_input_is_answered_before_the_training_stack_loads).
DEFERRED_IMPORTS = {"kmnist_sweep.cli"}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        found[".".join(("kmnist_sweep", *parts))] = path
    return found


def layer(module: str) -> str:
    return module.split(".")[1]


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported kmnist_sweep module, at the top level?) for each import in `path`."""
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        known = [n for n in names if n in modules()]
        found += [(n, id(node) in top) for n in known if n.startswith("kmnist_sweep.")]
    return found


def graph() -> dict[str, set[str]]:
    return {name: {m for m, _ in imports(path)} - {name} for name, path in modules().items()}


def test_layers_import_only_downwards() -> None:
    wrong = []
    for name, targets in graph().items():
        if name == "kmnist_sweep.__init__":
            continue
        for target in targets:
            if target.endswith("__init__") or target == "kmnist_sweep":
                continue
            mine, theirs = RANKS[layer(name)], RANKS[layer(target)]
            if theirs > mine or (theirs == mine and layer(name) != layer(target) and mine):
                wrong.append(f"{name} -> {target}")
    assert wrong == []


def test_no_import_inside_a_function() -> None:
    inside = [
        f"{name} imports {target} inside a function"
        for name, path in modules().items()
        for target, at_top in imports(path)
        if not at_top and name not in DEFERRED_IMPORTS
    ]
    assert inside == []


@pytest.mark.parametrize(
    "args",
    [["data=nope"], ["+sweep=batchsize", "study.n_trials=0"], ["final", "--trial", "x", "d"]],
)
def test_bad_input_is_answered_before_the_training_stack_loads(
    args: list[str], tmp_path: Path
) -> None:
    """A config or argument error through the real entry point, with Python's import log on:
    one error line and exit 2, and fastai (seconds to import) never imported."""
    done = run_cli(*args, cwd=tmp_path, env={"PYTHONPROFILEIMPORTTIME": "1"})
    lines = done.stderr.splitlines()
    errors = [line for line in lines if line.startswith("kmnist_sweep: error:")]
    assert done.returncode == 2 and len(errors) == 1, done.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in lines if line.startswith("import time:")}
    assert "kmnist_sweep.config.check" in imported  # the log was read
    assert "fastai" not in imported and "kmnist_sweep.train.engine" not in imported


def test_no_import_cycle() -> None:
    edges = graph()
    state: dict[str, int] = {}
    cycles: list[str] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in edges.get(node, ()):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in edges:
        if node not in state:
            visit(node, [node])
    assert cycles == []


@pytest.mark.parametrize("name", sorted(modules()))
def test_modules_are_a_few_hundred_lines(name: str) -> None:
    assert len(modules()[name].read_text().splitlines()) <= MAX_LINES


@pytest.mark.parametrize(
    "needle, owners",
    [
        ("import wandb", {"kmnist_sweep.results.tracking"}),
        ("._storage", {"kmnist_sweep.sweep.optuna_internals"}),
        ("._trial_id", {"kmnist_sweep.sweep.optuna_internals"}),
        ('"_backend"', {"kmnist_sweep.sweep.optuna_internals"}),
        # Suggest, report and prune happen in the objective; the protocol and the worker loop
        # pass the trial on, and the adapter writes its heartbeat.
        (
            "optuna.Trial",
            {
                "kmnist_sweep.sweep.objective",
                "kmnist_sweep.sweep.protocol",
                "kmnist_sweep.sweep.worker",
                "kmnist_sweep.sweep.optuna_internals",
            },
        ),
    ],
)
def test_one_owner_per_concern(needle: str, owners: set[str]) -> None:
    users = {name for name, path in modules().items() if needle in path.read_text()}
    assert users <= owners


def test_optuna_is_imported_only_by_the_sweep_and_results_layers() -> None:
    """Config, data and train know nothing of studies: a training run is the same inside a
    sweep or alone (the LR finder's study cache is sweep/lr_seed.py)."""
    offenders = []
    for name, path in modules().items():
        if RANKS[layer(name)] >= RANKS["results"]:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                roots = [node.module.split(".")[0]]
            else:
                continue
            offenders += [name for root in roots if root == "optuna"]
    assert offenders == []


def test_trial_attribute_names_are_spelled_once() -> None:
    """set_user_attr / user_attrs with a string literal only in trial_attrs itself."""
    offenders = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            call = isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "set_user_attr"
            if call and node.args and isinstance(node.args[0], ast.Constant):
                offenders.append(f"{name}: set_user_attr({node.args[0].value!r})")
    assert offenders == []


def test_design_doc_names_only_what_exists() -> None:
    """Each module row of docs/design.md names a file that exists, and each call in its
    "main calls" column is defined in that module."""
    import importlib
    import re

    doc = (PACKAGE.parent / "docs" / "design.md").read_text()
    missing = []
    for line in doc.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        module_path = cells[0].strip("`").split("`")[0]
        if module_path.endswith("/"):
            continue
        name = "kmnist_sweep." + module_path.removesuffix(".py").replace("/", ".")
        module = importlib.import_module(name)
        for call in re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)\[?[(\[]", cells[-1]):
            if not hasattr(module, call):
                missing.append(f"{name}.{call}")
    assert missing == []
