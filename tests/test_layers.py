"""The package's layering: imports point down, no circles, and the decision core is pure."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "computegroups"
PURE = ("computegroups.decide", "computegroups.placement", "computegroups.topology", "computegroups.memo")
EDGES = ("computegroups.providers", "computegroups.state", "computegroups.manager", "computegroups.runtime")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str) -> set[str]:
    """Every computegroups module ``name`` imports, anywhere in it (type-checking blocks included)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: the package ``level - 1`` above this module's, then the module
                above = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*above, base] if base else above)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            # Importing a.b.c runs the packages a.b first; the root's re-exports are left out (see below).
            parts = target.split(".")
            out |= {".".join(parts[:k]) for k in range(2, len(parts) + 1)}
    return {t for t in out if t in MODULES and t != name and not name.startswith(t + ".")}


GRAPH = {name: _imports(name) for name in MODULES}


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles() -> None:
    # The package root re-exports the public API and every module is inside it, so the root is not
    # a node of the graph; every other package's __init__ is.
    assert _cycles() == []


def test_the_decision_core_imports_no_edge() -> None:
    offenders = {name: sorted(t for t in GRAPH[name] if t.startswith(EDGES)) for name in GRAPH if name.startswith(PURE)}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_decision_core_never_awaits() -> None:
    for name, path in MODULES.items():
        if not name.startswith(PURE):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            assert not isinstance(node, ast.AsyncFunctionDef | ast.Await | ast.AsyncFor | ast.AsyncWith), name
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                assert not any(n and n.split(".")[0] in {"asyncio", "sqlite3", "socket"} for n in names), name


def test_the_manager_stays_a_thin_loop() -> None:
    assert len((PACKAGE / "manager.py").read_text().splitlines()) <= 600
