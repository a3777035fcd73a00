"""The docker SDK client and the one boundary where its errors become ours."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

import docker
import docker.errors
import requests.exceptions

from shared.errors import ContainerGone, EngineError, EngineUnavailable, ImageMissing

T = TypeVar("T")
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


class Engine:
    """One engine's SDK clients and the bounded pool every blocking call runs in, so a slow engine
    cannot starve the event loop or Starlette's threads; SDK errors become ours in ``call``."""

    def __init__(self, host: str, threads: int, timeout: int) -> None:
        self.host = host  # "": DOCKER_HOST or the local socket
        self._timeout = timeout
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="docker")
        self._client: docker.DockerClient | None = None
        self._stream_client: docker.DockerClient | None = None

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            self._client = make_client(self.host, self._timeout)
        return self._client

    @property
    def stream_client(self) -> docker.DockerClient:
        """A client without read timeout, for log streams that may stay silent for minutes."""
        if self._stream_client is None:
            self._stream_client = make_client(self.host, None)
        return self._stream_client

    async def call(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """fn(*args, **kw) in the pool, its errors mapped to ours."""
        loop = asyncio.get_running_loop()
        with docker_errors():
            return await loop.run_in_executor(self._pool, partial(fn, *args, **kw))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for c in (self._client, self._stream_client):
            if c is not None:
                c.close()
