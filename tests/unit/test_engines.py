"""An engine is its module plus its config section, nothing else: the registry finds it by kind,
and no other product file names it (what a second engine touches, checked on the two there are)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shared.config import engine_kinds, load_config
from shared.engines import backend_class, open_backend
from shared.engines.base import NodeBackend
from shared.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("manager", "checker", "nodeops", "shared", "toolserver_manager")


def naming(root: Path, kind: str) -> set[str]:
    """The product files that name engine kind: its class or config section, its module, its settings."""
    cap = kind.capitalize()
    words = re.compile(rf"\b{cap}Backend\b|\b{cap}Config\b|\bengines[./]{kind}\b|\bengine\.{kind}\b"
                       rf"|\bkind\s*==\s*[\"']{kind}[\"']")
    return {p.relative_to(root).as_posix() for package in PRODUCT for p in sorted((root / package).rglob("*.py"))
            if words.search(p.read_text())}


def own_files(root: Path, kind: str) -> set[str]:
    """The engine's own module (shared/engines/<kind>.py) or package, and the config section's file."""
    single = root / "shared" / "engines" / f"{kind}.py"
    files = [single] if single.exists() else sorted((root / "shared" / "engines" / kind).rglob("*.py"))
    return {p.relative_to(root).as_posix() for p in files} | {"shared/config.py"}


@pytest.mark.parametrize("kind", engine_kinds())
def test_only_its_module_and_config_section_name_an_engine(kind: str) -> None:
    assert naming(ROOT, kind) - own_files(ROOT, kind) == set()
    assert "shared/config.py" in naming(ROOT, kind)  # its section is there


def test_the_check_sees_an_engine_named_elsewhere(tmp_path: Path) -> None:
    for path, text in (("shared/engines/podman.py", "class PodmanBackend: ...\n"),
                       ("shared/config.py", "class PodmanConfig: ...\n"),
                       ("nodeops/x.py", "def f(cfg):\n    return cfg.engine.podman.socket\n"),
                       ("manager/y.py", "from shared.engines.podman import PodmanBackend\n"),
                       ("checker/z.py", "def g(cfg):\n    return cfg.engine.kind == 'podman'\n")):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    assert naming(tmp_path, "podman") - own_files(tmp_path, "podman") == {"nodeops/x.py", "manager/y.py",
                                                                         "checker/z.py"}


@pytest.mark.parametrize("kind", engine_kinds())
async def test_every_kind_opens_its_own_backend(kind: str) -> None:
    cfg = load_config(None, environ={}, overrides={"engine": {"kind": kind}})
    backend = open_backend(cfg)
    try:
        assert isinstance(backend, NodeBackend) and type(backend).__module__.startswith(f"shared.engines.{kind}")
    finally:
        await backend.close()


def test_a_kind_without_a_section_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"engine\.kind must be one of docker, fake, not 'podman'"):
        backend_class("podman")
