"""The only module that talks to a Docker engine.

The SDK is blocking, so every call runs in this backend's own bounded thread pool:
a slow engine cannot starve the event loop or Starlette's threads. SDK errors are
mapped to ours at one boundary (``_call``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from functools import partial
from typing import Any, TypeVar

import docker
import docker.errors
import requests.exceptions
from docker.types import DeviceRequest, Mount

from shared.errors import ContainerGone, EngineError, EngineUnavailable
from shared.models import ContainerInfo

log = logging.getLogger(__name__)
T = TypeVar("T")

LABEL_PREFIX = "toolserver-manager."
LABEL_MANAGER = LABEL_PREFIX + "manager_id"
LABEL_ROLE = LABEL_PREFIX + "role"
LABEL_CREATED = LABEL_PREFIX + "created_at"
LABEL_REPLICA = LABEL_PREFIX + "replica_id"
LABEL_CLIENT = LABEL_PREFIX + "client"
LABEL_PORT = LABEL_PREFIX + "node_port"
LABEL_PROJECT = LABEL_PREFIX + "project"
SECRET_ENV = "NODE_SECRET"  # how the reference node (node/app/auth.py) receives its secret
API_VERSION = "1.41"  # Debian bookworm's dockerd; newer engines still serve it

# run()-only or handled-by-us keys of XAgent's creation_kwargs
_DROP_KWARGS = {"detach", "remove", "stream", "ports", "labels", "name", "auto_remove"}


@contextlib.contextmanager
def docker_errors() -> Iterator[None]:
    """Translate SDK and transport errors into the project's hierarchy."""
    try:
        yield
    except docker.errors.NotFound as exc:
        raise ContainerGone(str(exc.explanation or exc)) from exc
    except docker.errors.ImageNotFound as exc:  # pragma: no cover - subclass of NotFound
        raise EngineError(str(exc)) from exc
    except docker.errors.APIError as exc:  # the engine answered: an error of the operation, not an outage
        raise EngineError(f"docker: {exc.explanation or exc}") from exc
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        raise EngineUnavailable(type(exc).__name__) from exc
    except docker.errors.DockerException as exc:
        raise EngineUnavailable(str(exc)) from exc


def _parse_time(value: str) -> float:
    """Docker's RFC 3339 time with nanoseconds, as a Unix timestamp (0 when absent)."""
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?", value or "")
    if not m or value.startswith("0001-"):
        return 0.0
    base = datetime.fromisoformat(m.group(1) + "+00:00").timestamp()
    return base + float("0." + (m.group(2) or "0"))


class DockerBackend:
    """Async facade over one Docker engine."""

    def __init__(self, docker_host: str = "", threads: int = 8, node_port: int = 31942,
                 publish_host: str = "127.0.0.1", timeout: int = 60) -> None:
        self.docker_host = docker_host
        self.node_port = node_port
        self.publish_host = publish_host
        self._timeout = timeout
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="docker")
        self._client: docker.DockerClient | None = None

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            kw: dict[str, Any] = {"version": API_VERSION, "timeout": self._timeout}
            if self.docker_host:
                self._client = docker.DockerClient(base_url=self.docker_host, **kw)
            else:
                self._client = docker.from_env(**kw)
        return self._client

    async def __aenter__(self) -> "DockerBackend":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._client is not None:
            self._client.close()

    async def _call(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        loop = asyncio.get_running_loop()
        with docker_errors():
            return await loop.run_in_executor(self._pool, partial(fn, *args, **kw))

    # --- engine ---------------------------------------------------------------
    async def ping(self) -> None:
        """Raise EngineUnavailable unless the engine answers."""
        await self._call(self.client.api.ping)

    # --- containers -----------------------------------------------------------
    async def create_node(self, creation_kwargs: dict[str, Any], labels: dict[str, str],
                          device_requests: list[dict[str, Any]] | None = None,
                          command: list[str] | str | None = None, read_only_workspace: str = "",
                          secret: str = "") -> str:
        """Create (not start) a node container with its labels and published port; return its id.

        The secret reaches the node as NODE_SECRET in its environment (never in a label: labels
        are listed by anyone who lists containers, and shown by the admin API).

        With read_only_workspace, the root filesystem is read-only and only that path (an
        anonymous volume, kept across restarts, removed with the node) and /tmp are writable.
        """
        kwargs = {k: v for k, v in creation_kwargs.items() if k not in _DROP_KWARGS}
        if read_only_workspace:
            kwargs["read_only"] = True
            kwargs.setdefault("tmpfs", {"/tmp": "rw,nosuid,size=256m"})
            kwargs["mounts"] = [*kwargs.get("mounts", []),
                                Mount(target=read_only_workspace, source=None, type="volume")]
        image = kwargs.pop("image")
        kwargs["labels"] = {**dict(creation_kwargs.get("labels") or {}), **labels,
                            LABEL_PORT: str(self.node_port), LABEL_PROJECT: "toolserver-manager"}
        kwargs["ports"] = {f"{self.node_port}/tcp": (self.publish_host, None)}
        if device_requests:
            kwargs["device_requests"] = [DeviceRequest(**r) for r in device_requests]
        if command is not None:
            kwargs["command"] = command
        if secret:
            env = kwargs.get("environment") or {}
            if isinstance(env, list):
                env = dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
            kwargs["environment"] = {**env, SECRET_ENV: secret}

        def create() -> str:
            # the high-level call translates docker-py's run() kwargs (mem_limit, cap_drop, ...)
            return self.client.containers.create(image, **kwargs).id  # type: ignore[no-any-return]

        return await self._call(create)

    async def start(self, node_id: str) -> int:
        """Start a container and return the host port its node port is published on."""
        for attempt in range(3):
            try:
                await self._call(self.client.api.start, node_id)
                break
            except EngineError as exc:
                # the engine picked a random host port that something else took meanwhile (another
                # engine on the same host, say): starting again picks another one
                if attempt == 2 or "port is already allocated" not in exc.detail and \
                        "external connectivity" not in exc.detail:
                    raise
                log.warning("node_start_retry node_id=%s error=%s", node_id[:12], exc.detail[:120])
        return (await self.inspect(node_id)).port

    async def restart(self, node_id: str, timeout: int = 5) -> int:
        await self._call(self.client.api.restart, node_id, timeout=timeout)
        return (await self.inspect(node_id)).port

    async def stop(self, node_id: str, timeout: int = 5) -> None:
        await self._call(self.client.api.stop, node_id, timeout=timeout)

    async def remove(self, node_id: str) -> bool:
        """Kill and remove a container; False when it was already gone."""
        try:
            await self._call(self.client.api.remove_container, node_id, force=True, v=True)
        except ContainerGone:
            return False
        except EngineError as exc:
            if "already in progress" in exc.detail:
                return True
            raise
        return True

    async def inspect(self, node_id: str) -> ContainerInfo:
        data = await self._call(self.client.api.inspect_container, node_id)
        state = data.get("State") or {}
        ports = ((data.get("NetworkSettings") or {}).get("Ports") or {}).get(f"{self.node_port}/tcp") or []
        labels = (data.get("Config") or {}).get("Labels") or {}
        return ContainerInfo(
            id=data["Id"],
            status=state.get("Status", "unknown"),
            health=((state.get("Health") or {}).get("Status")) or "none",
            labels=labels,
            created=float(labels.get(LABEL_CREATED) or _parse_time(data.get("Created", ""))),
            port=int(ports[0]["HostPort"]) if ports else 0,
            image=(data.get("Config") or {}).get("Image", ""),
        )

    async def node_secret(self, node_id: str) -> str:
        """The secret a node was created with, from the container's own config ("" if none)."""
        data = await self._call(self.client.api.inspect_container, node_id)
        for item in (data.get("Config") or {}).get("Env") or []:
            if item.startswith(SECRET_ENV + "="):
                return str(item[len(SECRET_ENV) + 1:])
        return ""

    async def list_nodes(self, label_filters: list[str]) -> list[ContainerInfo]:
        """One engine call: every container (any state) matching all the label filters."""
        raw = await self._call(self.client.api.containers, all=True, filters={"label": label_filters})
        out = []
        for c in raw:
            labels = c.get("Labels") or {}
            port = 0
            for p in c.get("Ports") or []:
                if p.get("PrivatePort") == int(labels.get(LABEL_PORT, self.node_port)) and p.get("PublicPort"):
                    port = int(p["PublicPort"])
                    break
            status_text = c.get("Status", "")
            health = "none"
            for h in ("healthy", "unhealthy", "health: starting"):
                if f"({h})" in status_text:
                    health = h.replace("health: ", "")
                    break
            out.append(ContainerInfo(
                id=c["Id"], status=c.get("State", "unknown"), health=health, labels=labels,
                created=float(labels.get(LABEL_CREATED) or c.get("Created") or 0), port=port,
                image=c.get("Image", ""),
            ))
        return out

    async def stats(self, node_id: str) -> dict[str, Any]:
        """One non-streaming stats sample: memory and CPU of a running container."""
        raw = await self._call(self.client.api.stats, node_id, stream=False)
        mem = raw.get("memory_stats") or {}
        cpu = raw.get("cpu_stats") or {}
        return {"memory_bytes": mem.get("usage"), "memory_limit_bytes": mem.get("limit"),
                "cpu_total_ns": (cpu.get("cpu_usage") or {}).get("total_usage"),
                "pids": (raw.get("pids_stats") or {}).get("current")}

    async def info(self) -> dict[str, Any]:
        """Engine facts for cluster-wide reads."""
        raw = await self._call(self.client.api.info)
        return {k: raw.get(k) for k in ("Name", "ServerVersion", "Containers", "ContainersRunning",
                                         "ContainersStopped", "NCPU", "MemTotal")}

    def events(self, label_filters: list[str], stop: Callable[[], bool]) -> Iterator[dict[str, Any]]:
        """Blocking generator of container events (run it in a thread); ends when stop() is true."""
        since = time.time()
        while not stop():
            with docker_errors():
                stream = self.client.api.events(since=since, decode=True,
                                                filters={"type": "container", "label": label_filters},
                                                until=time.time() + 1.0)
                for ev in stream:
                    since = max(since, float(ev.get("time", since)))
                    yield ev
