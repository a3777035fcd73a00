"""The package picture of README.md, checked: every module's imports, read with ast.

Imports go downward only (a package may import itself and what is below it); lazy imports
inside functions count as well. Only the store (a package) touches Redis and only the Docker backend
knows Docker.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# package -> the project packages it may import (besides itself)
MAY_IMPORT: dict[str, set[str]] = {
    "shared": set(),
    "nodeops": {"shared"},
    "checker": {"nodeops", "shared"},
    "manager": {"checker", "nodeops", "shared"},
    "toolserver_manager": set(),  # the client and the admin CLI stand alone: they speak HTTP
    "testing": {"shared"},
    "benchmarks": {"testing", "shared", "nodeops", "checker", "manager"},
    "tests": {"testing", "shared", "nodeops", "checker", "manager", "toolserver_manager", "benchmarks"},
}
PROJECT = set(MAY_IMPORT)
# third-party libraries one module or package (a path ending in /) owns
OWNED = {"redis": {"shared/store/"}, "docker": {"shared/engines/docker/"}}
OWNED_EXEMPT = ("tests/", "benchmarks/", "testing/")  # they drive the real parts directly


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level module name) of every import in a file, nested ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module.split(".")[0]))
    return out


def violations(root: Path) -> list[str]:
    bad = []
    for package, allowed in MAY_IMPORT.items():
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            for line, name in imports(path):
                if name in PROJECT and name != package and name not in allowed:
                    bad.append(f"{rel}:{line} imports {name}: {package} may import only {sorted(allowed)}")
                owners = OWNED.get(name)
                if owners and not rel.startswith(tuple(owners)) and not rel.startswith(OWNED_EXEMPT):
                    bad.append(f"{rel}:{line} imports {name}: only {sorted(owners)} may")
    return bad


def test_imports_go_downward_only() -> None:
    assert violations(ROOT) == []


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    (tmp_path / "checker").mkdir()
    (tmp_path / "checker" / "x.py").write_text("def f():\n    from manager import runtime\n")
    (tmp_path / "nodeops").mkdir()
    (tmp_path / "nodeops" / "y.py").write_text("import redis.asyncio\n")
    assert violations(tmp_path) == [
        "nodeops/y.py:1 imports redis: only ['shared/store/'] may",
        "checker/x.py:2 imports manager: checker may import only ['nodeops', 'shared']",
    ]


def module_imports(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """module -> the modules of packages it imports (TYPE_CHECKING and lazy imports included)."""
    mods = {p.relative_to(root).with_suffix("").as_posix().replace("/", "."): p
            for package in packages for p in sorted((root / package).rglob("*.py"))}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            graph[mod] |= {n for n in names if n in mods and n != mod}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or round a circle."""
    out: list[list[str]] = []
    seen: set[str] = set()
    for start in sorted(graph):
        if start in seen:
            continue
        reach = _reach(graph, start)
        if start in reach:  # every module that reaches start and that start reaches is in its circle
            group = sorted(m for m in reach if start in _reach(graph, m))
            seen |= set(group)
            out.append(group)
    return out


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    reach: set[str] = set()
    todo = [start]
    while todo:
        for nxt in graph[todo.pop()] - reach:
            reach.add(nxt)
            todo.append(nxt)
    return reach


def test_no_module_circles_in_nodeops_and_checker() -> None:
    assert circles(module_imports(ROOT, ("nodeops", "checker"))) == []


def test_the_check_sees_a_circle(tmp_path: Path) -> None:
    (tmp_path / "nodeops").mkdir()
    (tmp_path / "nodeops" / "a.py").write_text("from nodeops import b\n")
    (tmp_path / "nodeops" / "b.py").write_text("def f():\n    from nodeops.a import g\n")
    (tmp_path / "nodeops" / "c.py").write_text("from nodeops import a\n")
    assert circles(module_imports(tmp_path, ("nodeops",))) == [["nodeops.a", "nodeops.b"]]
