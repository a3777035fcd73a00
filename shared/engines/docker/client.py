"""The docker SDK client and the one boundary where its errors become ours."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import docker
import docker.errors
import requests.exceptions

from shared.errors import ContainerGone, EngineError, EngineUnavailable, ImageMissing

API_VERSION = "1.41"  # Debian bookworm's dockerd; newer engines still serve it


def make_client(host: str, timeout: int | None) -> docker.DockerClient:
    """A client of the engine at host ("": DOCKER_HOST or the local socket); timeout None: no read timeout."""
    kw: dict[str, Any] = {"version": API_VERSION, "timeout": timeout}
    return docker.DockerClient(base_url=host, **kw) if host else docker.from_env(**kw)


@contextlib.contextmanager
def docker_errors() -> Iterator[None]:
    """Translate SDK and transport errors into the project's hierarchy."""
    try:
        yield
    except docker.errors.ImageNotFound as exc:  # a NotFound too: caught first, it is no session's end
        found = re.search(r"No such image: (\S+)", str(exc.explanation or ""))
        raise ImageMissing(found.group(1) if found else str(exc.explanation or exc)) from exc
    except docker.errors.NotFound as exc:
        raise ContainerGone(str(exc.explanation or exc)) from exc
    except docker.errors.APIError as exc:  # the engine answered: an error of the operation, not an outage
        raise EngineError(f"docker: {exc.explanation or exc}") from exc
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        raise EngineUnavailable(type(exc).__name__) from exc
    except docker.errors.DockerException as exc:
        raise EngineUnavailable(str(exc)) from exc
