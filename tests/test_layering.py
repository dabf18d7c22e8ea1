"""The package's layering, checked from the import statements of every module.

* Library code (everything outside ``neuslice/experiments/``) never imports the experiment
  harness; only the harness itself and the deprecated alias table name it.
* No module imports a private name (``_x``) or a private module from another subpackage;
  ``neuslice._utils`` is the shared helper layer and is exempt.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "neuslice"
SUBPACKAGES = {
    "profiling",
    "runtime",
    "maintenance",
    "decomposition",
    "experiments",
    "ops",
    "_utils",
}


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield path, ".".join(parts), path.name == "__init__.py"


def _imports(path: pathlib.Path, module: str, is_pkg: bool):
    """(imported module, imported names) for every import in ``path``, made absolute."""
    tree = ast.parse(path.read_text(), str(path))
    package = module.split(".") if is_pkg else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            yield target, names
            if node.module is None:  # ``from . import x`` imports the module ``x``
                for n in names:
                    yield f"{target}.{n}", []


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in SUBPACKAGES else "core"


def test_every_module_is_seen():
    mods = {m for _, m, _ in _modules()}
    assert {
        "neuslice.profiling.profile",
        "neuslice.maintenance.restructure",
        "neuslice.experiments.cli",
        "neuslice.slicing",
    } <= mods


def test_library_never_imports_the_experiments():
    bad = []
    for path, module, is_pkg in _modules():
        if _layer(module) == "experiments" or module == "neuslice._utils.deprecated":
            continue
        for target, _ in _imports(path, module, is_pkg):
            if target == "neuslice.experiments" or target.startswith("neuslice.experiments."):
                bad.append(f"{module} imports {target}")
    assert not bad, "library code imports the experiment harness:\n" + "\n".join(bad)


def test_no_private_names_across_subpackages():
    bad = []
    for path, module, is_pkg in _modules():
        here = _layer(module)
        for target, names in _imports(path, module, is_pkg):
            if not target.startswith("neuslice"):
                continue
            there = _layer(target)
            if there in (here, "_utils"):
                continue
            private_module = [
                p for p in target.split(".")[1:] if p.startswith("_") and p not in ("_utils", "_C")
            ]
            private_names = [n for n in names if n.startswith("_") and n != "_C"]
            if private_module or private_names:
                bad.append(f"{module} imports {target} {private_names}")
    assert not bad, "private names cross subpackages:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "old,new",
    [
        ("evaluate", "experiments.sweep"),
        ("optim", "maintenance.masked_optimizer"),
        ("zoo", "experiments.zoo"),
        ("data", "experiments.data"),
        ("stats", "profiling.stats"),
    ],
)
def test_old_import_paths_warn_and_work(old, new):
    import importlib

    import neuslice

    mod = importlib.import_module(f"neuslice.{old}")
    target = importlib.import_module(f"neuslice.{new}")
    name = next(n for n in getattr(target, "__all__", dir(target)) if not n.startswith("_"))
    with pytest.warns(DeprecationWarning, match=f"neuslice.{new}"):
        got = getattr(mod, name)
    assert got is getattr(target, name)
    with pytest.warns(DeprecationWarning):
        assert getattr(getattr(neuslice, old), name) is getattr(target, name)
    assert callable(neuslice.profile)  # the function is not shadowed by the old module path
