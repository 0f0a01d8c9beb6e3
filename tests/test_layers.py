"""The layers of ../shared/DESIGN.md ("Layout"), checked on the import graph.

Every ``.py`` under ``src/flwr_nnunet`` (and the two app files at the repository
root) is parsed with :mod:`ast`; every import counts: at module level, inside
functions and classes, and under ``if TYPE_CHECKING:``. Relative imports are
resolved. ``from a import b`` is recorded as ``a.b`` (the submodule or the
name it imports), so a prefix rule on ``a`` covers it.

A new layer is one row of :data:`CONTRACTS`.
"""

from __future__ import annotations

import ast
import itertools
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "flwr_nnunet"
SOURCES = ROOT / "src" / PACKAGE
APP_FILES = ("server_app.py", "client_app.py")


class Contract(NamedTuple):
    """Modules under any of ``members`` (minus ``excluded``) never import anything under ``forbidden``."""

    name: str
    members: tuple[str, ...]
    forbidden: tuple[str, ...]
    excluded: tuple[str, ...] = ()


_P = PACKAGE + "."
CONTRACTS = (
    Contract(
        "core",
        (_P + "core",),
        ("nnunetv2", "dynamic_network_architectures", "flwr.serverapp", "flwr.clientapp")
        + tuple(_P + layer for layer in ("nnunet", "strategy", "site", "apps", "repair", "demo", "cli")),
    ),
    Contract(
        "nnunet",
        (_P + "nnunet",),
        tuple(_P + layer for layer in ("strategy", "site", "apps", "repair", "demo"))
        + ("flwr.serverapp", "flwr.clientapp"),
    ),
    Contract("strategy", (_P + "strategy",), tuple(_P + layer for layer in ("site", "apps", "demo", "repair"))),
    Contract("site", (_P + "site",), tuple(_P + layer for layer in ("strategy", "apps", "demo", "repair"))),
    Contract("apps", (_P + "apps",), tuple(_P + layer for layer in ("demo", "repair", "cli"))),
    Contract("server side", ("server_app", _P + "apps"), (_P + "apps.client",), excluded=(_P + "apps.client",)),
    Contract("client side", ("client_app", _P + "apps.client"), (_P + "apps.server",)),
)
"""(layer, its modules, what they never import): see DESIGN.md "Layout"."""

CYCLES_COUNT_TYPE_CHECKING = True
"""A type-only import still makes two modules depend on each other: a cycle through one is a cycle.

(It never fails at run time; break it with a Protocol or by moving the shared type down a layer.)"""

CORE_ALLOWED = ("torch", "numpy", "flwr.app", _P + "core", _P + "errors")
"""Besides the standard library, all that ``flwr_nnunet.core`` may import."""


@dataclass(frozen=True)
class Import:
    """One import statement's target as seen from one module."""

    module: str  # the importing module
    target: str  # dotted name imported (``a.b`` for ``from a import b``)
    path: Path
    line: int
    statement: str  # as written, e.g. ``from flwr.app import Array``
    where: str  # "module level", "in function f", "under TYPE_CHECKING"

    def __str__(self) -> str:
        return f"{self.module} ({self.path.relative_to(ROOT)}:{self.line}, {self.where}): `{self.statement}`"


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for the package and the root app files."""
    modules = {}
    for path in sorted(SOURCES.rglob("*.py")):
        parts = path.relative_to(SOURCES.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    for name in APP_FILES:
        if (ROOT / name).is_file():
            modules[name.removesuffix(".py")] = ROOT / name
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, path: Path, is_package: bool):
        self.module, self.path = module, path
        self.package = module if is_package else module.rpartition(".")[0]
        self.scopes: list[str] = []
        self.type_checking = 0
        self.imports: list[Import] = []

    def _where(self) -> str:
        if self.type_checking:
            return "under TYPE_CHECKING"
        return f"in {'.'.join(self.scopes)}" if self.scopes else "module level"

    def _add(self, node: ast.stmt, target: str, statement: str) -> None:
        self.imports.append(Import(self.module, target, self.path, node.lineno, statement, self._where()))

    def _scoped(self, node: ast.AST) -> None:
        self.scopes.append(getattr(node, "name", "?"))
        self.generic_visit(node)
        self.scopes.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scoped

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self.type_checking += 1
        for child in node.body:
            self.visit(child)
        self.type_checking -= 1
        for child in node.orelse:
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name, f"import {alias.name}")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.rsplit(".", node.level - 1)[0] if node.level > 1 else self.package
            source = f"{base}.{node.module}" if node.module else base
        else:
            source = node.module or ""
        written = "." * node.level + (node.module or "")
        for alias in node.names:
            target = source if alias.name == "*" else f"{source}.{alias.name}"
            self._add(node, target, f"from {written} import {alias.name}")


def collect_imports() -> list[Import]:
    imports = []
    for module, path in module_files().items():
        collector = _Collector(module, path, path.name == "__init__.py")
        collector.visit(ast.parse(path.read_text(), filename=str(path)))
        imports.extend(collector.imports)
    return imports


IMPORTS = collect_imports()
MODULES = module_files()


def resolve(target: str) -> str | None:
    """The project module an import target loads (``a.b.name`` -> ``a.b``), or None if it is not ours."""
    name = target
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def members(contract: Contract) -> Iterator[Import]:
    for imp in IMPORTS:
        if any(under(imp.module, m) for m in contract.members) and not any(
            under(imp.module, e) for e in contract.excluded
        ):
            yield imp


def test_the_import_graph_is_seen():
    """Guard against a vacuous pass: the files are found and their imports collected."""
    assert {"flwr_nnunet.core.aliasing", "flwr_nnunet.core.codec", "server_app", "client_app"} <= set(MODULES)
    assert any(imp.target == "flwr.app.ArrayRecord" and imp.module == "flwr_nnunet.core.codec" for imp in IMPORTS)
    assert any(imp.where != "module level" for imp in IMPORTS)  # function-level imports are collected too
    for contract in CONTRACTS:
        assert any(True for _ in members(contract)), f"contract {contract.name!r} matches no module"


@pytest.mark.parametrize("contract", CONTRACTS, ids=[c.name for c in CONTRACTS])
def test_layer_never_imports_what_it_must_not(contract):
    offending = [
        f"{imp} imports {prefix}"
        for imp in members(contract)
        for prefix in contract.forbidden
        if under(imp.target, prefix)
    ]
    if offending:
        pytest.fail(
            f"layer {contract.name!r} must not import {', '.join(contract.forbidden)}:\n  " + "\n  ".join(offending),
            pytrace=False,
        )


def test_core_imports_only_the_standard_library_torch_numpy_and_flwr_app():
    stdlib = sys.stdlib_module_names
    offending = [
        str(imp)
        for imp in IMPORTS
        if under(imp.module, _P + "core")
        and imp.target.partition(".")[0] not in stdlib
        and not any(under(imp.target, allowed) for allowed in CORE_ALLOWED)
    ]
    if offending:
        pytest.fail(
            "flwr_nnunet.core may import only the standard library and "
            + ", ".join(CORE_ALLOWED)
            + ":\n  "
            + "\n  ".join(offending),
            pytrace=False,
        )


def _cycles(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """One cycle (as a closed path) per strongly connected component that has one (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in graph.get(node, {}):
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)

    cycles = []
    for component in components:
        inside = set(component)
        start = min(component)
        # Shortest path from start back to start inside the component (breadth first).
        previous: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in previous:
            following = []
            for node in frontier:
                for nxt in sorted(graph[node]):
                    if nxt in inside and nxt not in previous:
                        previous[nxt] = node
                        following.append(nxt)
            frontier = following
        path = [start]
        node = previous[start]
        while node != start:
            path.append(node)
            node = previous[node]
        path.append(start)
        cycles.append(path[::-1])
    return cycles


def test_no_import_cycles_among_the_package_modules():
    """Module-level, function-level and ``if TYPE_CHECKING:`` imports alike (see :data:`CYCLES_COUNT_TYPE_CHECKING`)."""
    graph: dict[str, dict[str, Import]] = {module: {} for module in MODULES}
    for imp in IMPORTS:
        target = resolve(imp.target)
        if target is None or target == imp.module:
            continue
        if imp.where == "under TYPE_CHECKING" and not CYCLES_COUNT_TYPE_CHECKING:
            continue
        graph[imp.module].setdefault(target, imp)
    cycles = _cycles(graph)
    described = []
    for cycle in cycles:
        steps = [f"{graph[a][b]}" for a, b in itertools.pairwise(cycle)]
        described.append(" -> ".join(cycle) + "\n    " + "\n    ".join(steps))
    if cycles:
        pytest.fail("import cycles:\n  " + "\n  ".join(described), pytrace=False)


def test_cycle_finder_reports_the_path():
    a_b = Import("a", "b", ROOT, 1, "import b", "module level")
    graph = {"a": {"b": a_b}, "b": {"c": a_b}, "c": {"a": a_b}, "d": {"a": a_b}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b": a_b}, "b": {}}) == []


def test_collector_sees_every_kind_of_import():
    source = """
from typing import TYPE_CHECKING
from . import sibling
from ..core.aliasing import AliasMap
if TYPE_CHECKING:
    from flwr_nnunet.site.site import Site
else:
    import json
def f():
    import nnunetv2.inference
class C:
    def g(self):
        from flwr import serverapp
"""
    collector = _Collector("flwr_nnunet.strategy.x", SOURCES / "strategy" / "x.py", is_package=False)
    collector.visit(ast.parse(source))
    seen = {(imp.target, imp.where) for imp in collector.imports}
    assert seen == {
        ("typing.TYPE_CHECKING", "module level"),
        ("flwr_nnunet.strategy.sibling", "module level"),
        ("flwr_nnunet.core.aliasing.AliasMap", "module level"),
        ("flwr_nnunet.site.site.Site", "under TYPE_CHECKING"),
        ("json", "module level"),
        ("nnunetv2.inference", "in f"),
        ("flwr.serverapp", "in C.g"),
    }
    package = _Collector("flwr_nnunet.core", SOURCES / "core" / "__init__.py", is_package=True)
    package.visit(ast.parse("from .codec import to_array_record\nfrom .. import errors"))
    assert [imp.target for imp in package.imports] == ["flwr_nnunet.core.codec.to_array_record", "flwr_nnunet.errors"]
