"""The package picture of README.md, checked: every module's imports, read with ast.

Imports go downward only (a package may import itself and what is below it); lazy imports
inside functions count as well. Only the store touches Redis and only the Docker backend
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
# third-party libraries one module owns
OWNED = {"redis": {"shared/store.py"}, "docker": {"shared/docker_backend.py"}}
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
                if owners and rel not in owners and not rel.startswith(OWNED_EXEMPT):
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
        "nodeops/y.py:1 imports redis: only ['shared/store.py'] may",
        "checker/x.py:2 imports manager: checker may import only ['nodeops', 'shared']",
    ]
