"""The package map of docs/architecture.md, held by a test: which package may import which, and no
import cycle between modules. Read from the source (imports under `if TYPE_CHECKING:` do not run and
are left out), so a new import that breaks the data flow fails here, not in review."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICE = ROOT / "service"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            skipped.update(id(inner) for inner in ast.walk(node))
    return skipped


def _imports(path: Path) -> Iterator[str]:
    """The service modules `path` imports at run time (`from package import module` names the module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = _type_checking_nodes(tree)
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.split(".")[0] == "service")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "service":
                continue
            submodules = [f"{node.module}.{a.name}" for a in node.names]
            if all(_is_module(s) for s in submodules):
                yield from submodules
            else:
                yield node.module


GRAPH: dict[str, set[str]] = {_module_name(p): set(_imports(p)) for p in sorted(SERVICE.rglob("*.py"))}


def _package(module: str) -> str:
    """`service.core.panels` -> `service.core`; top-level modules stand for themselves."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read():
    """The reader finds the modules and their imports (a broken reader would pass every rule below)."""
    assert "service.core.panels" in GRAPH and "service.live.worker" in GRAPH
    assert "service.core.anc" in GRAPH["service.core.panels"]
    assert any(m.startswith("service.core") for m in GRAPH["service.live.worker"])


def test_no_module_import_cycle():
    """No two modules import each other, directly or through others."""
    assert _cycles(GRAPH) == []


def test_no_package_import_cycle():
    """The packages form a DAG: data flows one way."""
    packages: dict[str, set[str]] = {}
    for module, deps in GRAPH.items():
        here = _package(module)
        packages.setdefault(here, set()).update(d for d in map(_package, deps) if d != here)
    assert _cycles(packages) == []


# (package, packages it must not import at run time): docs/architecture.md "Packages".
FORBIDDEN = [
    (
        "service.core",
        {"service.output", "service.live", "service.replay", "service.explain", "service.config"},
    ),
    ("service.fhir", {"service.core", "service.output", "service.live", "service.replay", "service.config"}),
    ("service.output", {"service.live", "service.replay", "service.explain"}),
    ("service.replay", {"service.live", "service.explain"}),
    ("service.config", {"service.live", "service.output", "service.replay", "service.explain"}),
]


@pytest.mark.parametrize(("package", "forbidden"), FORBIDDEN, ids=[p for p, _ in FORBIDDEN])
def test_a_package_imports_only_what_the_map_allows(package, forbidden):
    """Each package imports only the packages the map allows it (at run time)."""
    crossings = sorted(
        f"{module} -> {dep}"
        for module, deps in GRAPH.items()
        if _package(module) == package
        for dep in deps
        if _package(dep) in forbidden
    )
    assert crossings == []


def test_the_core_does_no_io():
    """The core is pure: no network, files, processes, clock or logging libraries."""
    io_modules = {
        "aiohttp",
        "asyncio",
        "asyncpg",
        "sqlite3",
        "subprocess",
        "socket",
        "structlog",
        "logging",
        "time",
    }
    found = []
    for path in sorted((SERVICE / "core").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            found += [f"{path.name}: {n}" for n in names if n.split(".")[0] in io_modules]
    assert found == []
