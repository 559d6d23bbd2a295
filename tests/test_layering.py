"""The package's layers import only downwards (docs/architecture.md):

    passes < core < methods < prepare < stats, deploy < api < integrations, app

Every import in every source file counts, function-level ones included. Also: no import cycle
between modules, passes/ never imports sparsify, and no source file over 400 lines.
"""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
RANK = {"passes": 0, "core": 1, "methods": 2, "prepare": 3, "stats": 4, "deploy": 4, "api": 5,
        "integrations": 6, "app": 6}
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str | None:
    """``passes``, a sparsify sub-package, or ``api`` for the package facade and its top-level modules."""
    parts = module.split(".")
    if parts[0] == "passes":
        return "passes"
    if parts[0] != "sparsify":
        return None
    if len(parts) > 1 and parts[1] in RANK:
        return parts[1]
    if parts[1:] == ["__main__"]:
        # ``python -m sparsify`` is the command-line entry point, the same as the ``sparsify``
        # console script (sparsify.app.cli): it sits on top, with app, and imports the CLI
        return "app"
    return "api"  # sparsify, sparsify.api


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: Path) -> list[tuple[int, str]]:
    """``(line, imported module)`` for every import in ``path``; ``from a import b`` yields ``a.b``
    when ``a.b`` is a module of the project, else ``a``."""
    module, tree = module_name(path), ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = resolve(module, path.name == "__init__.py", node)
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((node.lineno, sub if sub in MODULES else base))
    return out


SOURCES = sorted(p for d in ("sparsify", "passes") for p in (ROOT / d).rglob("*.py"))
MODULES = {module_name(p) for p in SOURCES}


def test_layers_are_folders():
    assert {p.name for p in (ROOT / "sparsify").iterdir() if p.is_dir() and (p / "__init__.py").exists()} \
        == set(RANK) - {"passes", "api"}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_downwards(path):
    mine = layer_of(module_name(path))
    bad = []
    for line, target in imports_of(path):
        theirs = layer_of(target)
        if theirs is None or theirs == mine:
            continue
        if mine == "passes":
            bad.append(f"line {line}: passes/ imports {target}")
        elif RANK[theirs] >= RANK[mine]:
            bad.append(f"line {line}: {mine} imports {target} ({theirs}, not below {mine})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    g = nx.DiGraph()
    for path in SOURCES:
        src = module_name(path)
        for _, target in imports_of(path):
            # importing a package runs its __init__: an edge to the package's own module
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != src and not src.startswith(target + "."):
                g.add_edge(src, target)
    cycles = list(nx.simple_cycles(g))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c + [c[0]]) for c in cycles[:5])


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_source_files_stay_small(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(ROOT)} has {n} lines (> {MAX_LINES}): split it by job"


def test_the_checker_sees_an_upward_import(tmp_path):
    """The rule fires: a core module importing from methods is reported."""
    assert layer_of("sparsify.core.state") == "core" and layer_of("sparsify.methods.st3") == "methods"
    assert RANK[layer_of("sparsify.methods.st3")] >= RANK[layer_of("sparsify.core.state")]
    assert layer_of("sparsify") == "api" and layer_of("torch") is None
    assert layer_of("sparsify.__main__") == "app"
