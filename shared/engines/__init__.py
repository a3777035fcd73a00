"""The container engines, and the one place that picks the implementation a configuration runs on.

base.py is the NodeBackend interface; each engine is a package beside it (docker/). Importing
this package imports no engine: the one a configuration names is imported when it is opened.
"""

from __future__ import annotations

from shared.config import Config
from shared.engines.base import NodeBackend


def open_backend(cfg: Config) -> NodeBackend:
    """The backend of the engine cfg names."""
    from shared.engines.docker import DockerBackend

    return DockerBackend(cfg)
