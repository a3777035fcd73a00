"""The Docker engine (engine.kind: docker): the only package that imports the docker SDK."""

from shared.engines.docker.backend import DockerBackend

BACKEND = DockerBackend

__all__ = ["BACKEND", "DockerBackend"]
