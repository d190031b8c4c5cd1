"""The package's shape: no import cycles between reloader's modules, and no module past about 300 lines.

Imports are read from the source with `ast`, not by importing: every `import`/`from` of a reloader
module counts, wherever it sits (module level, inside a function, under `if TYPE_CHECKING:`), since a
cycle hidden in a function or a type-only import is still two modules that cannot be understood, or
split, one without the other.
"""

from __future__ import annotations

import ast
from collections import deque
from itertools import pairwise
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "reloader"
MAX_LINES = 320  # "about 300": room for a docstring's worth of slack, not for a second module's worth


def module_names(package: Path) -> dict[str, Path]:
    """Dotted name -> file, for every module under `package` (an __init__.py names its package)."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = [package.name, *path.relative_to(package).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def import_edges(package: Path) -> dict[str, dict[str, int]]:
    """module -> {imported reloader module: line of its first import}, relative imports resolved."""
    modules = module_names(package)
    edges: dict[str, dict[str, int]] = {name: {} for name in modules}
    for name, path in modules.items():
        # The package a relative import starts from: the module's own for an __init__.py, else its parent's.
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = here[: len(here) - (node.level - 1)] if node.level - 1 <= len(here) else []
                    base = ".".join([*base_parts, *([node.module] if node.module else [])])
                else:
                    base = node.module or ""
                # `from . import jobs` imports the module reloader.jobs; `from .jobs import Job`, reloader.jobs.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                # `import reloader.a.b` runs reloader.a.b: keep the longest prefix that is one of ours.
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target:
                    edges[name].setdefault(target, node.lineno)
    return edges


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """One shortest cycle per strongly connected component that has one, each as [a, b, ..., a]."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:  # Tarjan; the package is a few dozen modules, recursion is fine
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges[node]:
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            components.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            connect(node)

    found = []
    for component in sorted(components):
        start = component[0]
        if len(component) == 1 and start not in edges[start]:
            continue
        # Breadth-first from `start` back to itself, within the component: the shortest cycle through it.
        members = set(component)
        came_from: dict[str, str] = {}
        queue = deque([start])
        while queue:
            node = queue.popleft()
            if start in edges[node]:
                path = [start]
                while node != start:
                    path.append(node)
                    node = came_from[node]
                found.append([start, *reversed(path[1:]), start])
                break
            for nxt in sorted(edges[node]):
                if nxt in members and nxt not in came_from and nxt != start:
                    came_from[nxt] = node
                    queue.append(nxt)
    return found


def describe(cycle: list[str], edges: dict[str, dict[str, int]], package: Path) -> str:
    modules = module_names(package)
    steps = [f"{a} -> {b} ({modules[a].relative_to(package.parent)}:{edges[a][b]})" for a, b in pairwise(cycle)]
    return " -> ".join(cycle) + "\n      " + "\n      ".join(steps)


def test_no_import_cycles_between_reloader_modules():
    edges = import_edges(PACKAGE)
    found = cycles(edges)

    assert not found, (
        f"{len(found)} import cycle(s) in reloader/ (every import counts, TYPE_CHECKING and function-local "
        "ones too); break each by moving what both sides need into a module that imports neither:\n  "
        + "\n  ".join(describe(c, edges, PACKAGE) for c in found)
    )


def test_no_module_is_over_about_300_lines():
    sizes = {path: len(path.read_text(encoding="utf-8").splitlines()) for path in PACKAGE.rglob("*.py")}
    over = sorted(((n, p) for p, n in sizes.items() if n > MAX_LINES), reverse=True)

    assert not over, f"modules over {MAX_LINES} lines; split each along a seam of its own:\n  " + "\n  ".join(
        f"{p.relative_to(PACKAGE.parent)}: {n} lines" for n, p in over
    )


def test_the_cycle_check_sees_relative_type_checking_and_function_local_imports(tmp_path: Path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from .. import a\n")
    (package / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n")
    (package / "b.py").write_text("import os\n\n\ndef f():\n    from .sub import c\n")
    (package / "sub" / "c.py").write_text("from ..a import x\nfrom pkg import b\n")
    (package / "d.py").write_text("from . import b\nimport pkg.sub.c\n")

    edges = import_edges(package)

    assert edges == {
        "pkg": {},
        "pkg.sub": {"pkg.a": 1},
        "pkg.a": {"pkg.b": 3},
        "pkg.b": {"pkg.sub.c": 5},
        "pkg.sub.c": {"pkg.a": 1, "pkg.b": 2},
        "pkg.d": {"pkg.b": 1, "pkg.sub.c": 2},
    }
    assert cycles(edges) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]
    assert "pkg.b -> pkg.sub.c (pkg/b.py:5)" in describe(cycles(edges)[0], edges, package)
