"""The Docker engine: the only package that imports the docker SDK."""

from shared.engines.docker.backend import DockerBackend

__all__ = ["DockerBackend"]
