"""The backend this configuration runs on: the one place that picks an implementation."""

from __future__ import annotations

from shared.backend import NodeBackend
from shared.config import Config
from shared.docker_backend import DockerBackend


def open_backend(cfg: Config) -> NodeBackend:
    return DockerBackend(cfg)
