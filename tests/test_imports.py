"""The import graph of the project's own modules: no cycles, and the layers' boundaries hold.

Every import counts, at module level or inside a function (a lazy import is still a
dependency), under `TYPE_CHECKING` too. `from pkg import name` depends on `pkg.name` when that
is a module, else on `pkg`.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

from tests.conftest import REPO_ROOT

PACKAGES = ("engine_build", "service")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    """Every module of the project's packages, by dotted name."""
    return {
        _module_name(path): path
        for package in PACKAGES
        for path in sorted((REPO_ROOT / package).rglob("*.py"))
    }


def imports_of(name: str) -> tuple[set[str], set[str]]:
    """(project modules, other top-level packages) that module `name` imports."""
    tree = ast.parse(modules()[name].read_text())
    ours, theirs = set(), set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [
                f"{node.module}.{alias.name}"
                if f"{node.module}.{alias.name}" in modules()
                else node.module
                for alias in node.names
            ]
        for target in targets:
            if target.split(".")[0] in PACKAGES:
                ours.add(target)
            else:
                theirs.add(target.split(".")[0])
    return ours, theirs


@cache
def graph() -> dict[str, frozenset[str]]:
    """Module -> the project modules it imports."""
    return {name: frozenset(imports_of(name)[0]) for name in modules()}


def reachable(start: str) -> set[str]:
    """Every project module `start` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for target in graph().get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def cycles() -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph().get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph().get(node, ()):
                found.append(sorted(group))

    for node in sorted(graph()):
        if node not in index:
            visit(node)
    return found


def test_every_import_of_the_project_resolves_to_one_of_its_modules():
    unknown = {(m, t) for m, targets in graph().items() for t in targets if t not in modules()}
    assert unknown == set()


def test_no_module_imports_itself_through_others():
    assert cycles() == []


def test_the_cycle_finder_finds_a_cycle(monkeypatch):
    fake = {"service.a": frozenset({"service.b"}), "service.b": frozenset({"service.a"})}
    monkeypatch.setattr(f"{__name__}.graph", lambda: fake)
    assert cycles() == [["service.a", "service.b"]]


def test_engine_build_never_imports_service():
    offenders = {
        (name, target)
        for name in modules()
        if name.startswith("engine_build")
        for target in graph()[name]
        if target.startswith("service")
    }
    assert offenders == set()


def test_the_client_programs_import_neither_torch_nor_the_runtime():
    client = [name for name in modules() if name.startswith("service.client")]
    assert client, "service.client holds nemotron-chat and nemotron-healthcheck"
    for name in client:
        ours = reachable(name) | {name}
        assert not {m for m in ours if not m.startswith("service.client") and m != "service"}
        theirs = set().union(*(imports_of(m)[1] for m in ours))
        assert not theirs & {"torch", "numpy", "safetensors", "tokenizers"}, name


def test_the_runtime_never_imports_the_layers_above_it():
    above = ("service.server", "service.chat", "service.startup", "service.client")
    above += ("service.observability", "service.cli", "service.user_errors")
    for name in (m for m in modules() if m.startswith("service.runtime")):
        assert not {m for m in reachable(name) if m.startswith(above)}, name


def test_observability_and_the_chat_layer_never_import_the_server():
    # The terminal chat is a program of its own (like service.cli), not part of the layer.
    layer = ("service.observability", "service.chat.turns", "service.chat.formats")
    for name in (m for m in modules() if m.startswith(layer)):
        assert not {m for m in reachable(name) if m.startswith("service.server")}, name
