"""The package picture of README.md, checked: every module's imports, read with ast.

Imports go downward only (a package may import itself and what is below it); lazy imports
inside functions count as well. Only the store (a package) touches Redis and only the Docker backend
knows Docker. Inside manager/ the same holds between its rooms (sub-packages), and no module
imports another round a circle.
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
    # the client library stands alone, so using it (its one TLS context) adds no upward edge
    "testing": {"shared", "toolserver_manager"},
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


# manager/'s rooms -> the rooms each may import besides itself and the two every room stands on
# (edge, replica); the modules at manager/'s top (app, main, entry, routing, openapi) assemble the
# rooms and may import any, but no room imports them
BASE_ROOMS = {"edge", "replica"}
ROOMS: dict[str, set[str]] = {
    "edge": set(),  # connection bounds, client keys, errors -> HTTP, JSON answers
    "replica": set(),  # Runtime, address cache and activity, registry heartbeat
    "session": set(),  # the XAgent routes, internal forwards, cookie -> node
    "proxy": {"session"},  # HTTP and WebSocket to the node
    "admin": {"session"},  # /admin: token, limiter, fan-out (reads the internal routes' helpers)
    "mcp": {"proxy"},  # /mcp: tool calls go through the proxy
    "events": {"session", "admin"},  # /ws/events: a session's events, or every one with the admin token
    "console": {"admin", "events", "proxy", "forks"},  # /ui/: the admin API (forks and snapshots too), events, a shell
    "forks": {"session", "admin"},  # /fork_session, /snapshot_session, their admin and internal routes
}


def room_violations(root: Path) -> list[str]:
    """Imports between manager/'s rooms that ROOMS does not allow, or from a room up to the top."""
    bad = []
    for path in sorted((root / "manager").rglob("*.py")):
        rel = path.relative_to(root)
        room = rel.parts[1] if len(rel.parts) > 2 else None  # None: a module at manager/'s top
        if room is None:
            continue
        allowed = ROOMS.get(room, set()) | BASE_ROOMS | {room}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "manager" else [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] != "manager":
                    continue
                target = parts[1] if len(parts) > 1 else "manager"
                if target not in ROOMS:
                    bad.append(f"{rel.as_posix()}:{node.lineno} imports {name}: a room never imports manager/'s top")
                elif target not in allowed:
                    bad.append(f"{rel.as_posix()}:{node.lineno} imports {name}: manager/{room}/ may import only "
                               f"{sorted(allowed - {room})}")
    return bad


TOP = {"__init__", "app", "main", "entry", "routing", "openapi"}  # manager/'s top: the assembly alone


def test_manager_rooms_import_downward_only() -> None:
    assert sorted(p.name for p in (ROOT / "manager").iterdir() if (p / "__init__.py").exists()) == sorted(ROOMS)
    # new code goes in the room of its job (README, Layout), or in a new room listed in ROOMS
    assert {p.stem for p in (ROOT / "manager").glob("*.py")} - TOP == set()
    assert room_violations(ROOT) == []


def test_the_check_sees_a_room_importing_up(tmp_path: Path) -> None:
    (tmp_path / "manager" / "edge").mkdir(parents=True)
    (tmp_path / "manager" / "edge" / "x.py").write_text("def f():\n    from manager.admin import api\n")
    (tmp_path / "manager" / "proxy").mkdir()
    (tmp_path / "manager" / "proxy" / "y.py").write_text("from manager import app\nfrom manager.session import resolve\n")
    assert room_violations(tmp_path) == [
        "manager/edge/x.py:2 imports manager.admin: manager/edge/ may import only ['replica']",
        "manager/proxy/y.py:1 imports manager.app: a room never imports manager/'s top",
    ]


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


def test_no_module_circles_in_manager_nodeops_and_checker() -> None:
    assert circles(module_imports(ROOT, ("manager", "nodeops", "checker"))) == []


def test_the_check_sees_a_circle(tmp_path: Path) -> None:
    (tmp_path / "nodeops").mkdir()
    (tmp_path / "nodeops" / "a.py").write_text("from nodeops import b\n")
    (tmp_path / "nodeops" / "b.py").write_text("def f():\n    from nodeops.a import g\n")
    (tmp_path / "nodeops" / "c.py").write_text("from nodeops import a\n")
    assert circles(module_imports(tmp_path, ("nodeops",))) == [["nodeops.a", "nodeops.b"]]
