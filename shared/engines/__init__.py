"""The container engines, found by kind: the one place that picks the implementation a configuration runs on.

base.py is the NodeBackend interface. Each engine is a module or package beside it named by
its kind (docker/, fake.py) that exposes ``BACKEND``, its NodeBackend class, built from the
Config; its settings are the section of the same name under ``engine`` in shared/config.py,
and ``engine.kind`` names the one that runs. Nothing else names an engine, so a new one is its
module plus its config section (tests/unit/test_engines.py checks it). Importing this package
imports no engine: the one a configuration names is imported when it is opened.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import cast

from shared.config import Config, engine_kinds
from shared.engines.base import NodeBackend
from shared.errors import ConfigError


def backend_class(kind: str) -> Callable[[Config], NodeBackend]:
    """The NodeBackend class of an engine kind; ConfigError for a kind with no section or module."""
    if kind not in engine_kinds():
        raise ConfigError(f"engine.kind must be one of {', '.join(engine_kinds())}, not {kind!r}")
    cls = importlib.import_module(f"{__name__}.{kind}").BACKEND
    if not (isinstance(cls, type) and issubclass(cls, NodeBackend)):
        raise ConfigError(f"shared/engines/{kind}: BACKEND is not a NodeBackend")
    return cast(Callable[[Config], NodeBackend], cls)


def open_backend(cfg: Config) -> NodeBackend:
    """The backend of the engine cfg names (engine.kind)."""
    return backend_class(cfg.engine.kind)(cfg)
