"""The Docker engine as a NodeBackend: the only module that knows Docker's words.

Labels, label filters, state names and port bindings stay in here. The SDK is blocking, so every call runs in this backend's own bounded thread pool:
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

from shared.backend import Address, NewNode, NodeBackend, NodeInfo
from shared.config import Config
from shared.errors import ContainerGone, EngineError, EngineUnavailable
from shared.models import NodeStatus, Role

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
# Docker's container states are ours by the same names; one the engine adds later passes as is
_STATES = {s.value: s for s in (NodeStatus.CREATED, NodeStatus.RUNNING, NodeStatus.PAUSED, NodeStatus.RESTARTING,
                                NodeStatus.REMOVING, NodeStatus.EXITED, NodeStatus.DEAD)}
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


def _state(value: str) -> str:
    return _STATES.get(value, value)


def _owner_filter(owner: str, role: str | None = None) -> list[str]:
    return [f"{LABEL_MANAGER}={owner}"] + ([f"{LABEL_ROLE}={role}"] if role else [])


class DockerBackend(NodeBackend):
    """One Docker engine, configured by the node section of the config."""

    def __init__(self, cfg: Config, timeout: int = 60) -> None:
        n = cfg.node
        self.docker_host = cfg.docker_host
        self.node_port = n.port
        self.publish_host = n.publish_host
        self.advertise_host = n.advertise_host
        self._creation_kwargs = n.creation_kwargs
        self._device_requests = n.device_requests
        self._read_only_workspace = n.workspace_path if n.read_only_root else ""
        self._timeout = timeout
        self._pool = ThreadPoolExecutor(max_workers=cfg.docker_threads, thread_name_prefix="docker")
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
    async def create(self, node: NewNode) -> str:
        """Create (not start) a node container with its labels and published port; return its id.

        The secret reaches the node as NODE_SECRET in its environment (never in a label: labels
        are listed by anyone who lists containers, and shown by the admin API).

        With node.read_only_root, the root filesystem is read-only and only the workspace (an
        anonymous volume, kept across restarts, removed with the node) and /tmp are writable.
        """
        creation_kwargs = self._creation_kwargs
        device_requests = self._device_requests
        read_only_workspace = self._read_only_workspace
        labels = {LABEL_MANAGER: node.owner, LABEL_ROLE: node.role, LABEL_CREATED: f"{node.created_at:.3f}",
                  LABEL_REPLICA: node.replica_id}
        if node.client:
            labels[LABEL_CLIENT] = node.client
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
        if node.secret:
            env = kwargs.get("environment") or {}
            if isinstance(env, list):
                env = dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
            kwargs["environment"] = {**env, SECRET_ENV: node.secret}

        def create() -> str:
            # the high-level call translates docker-py's run() kwargs (mem_limit, cap_drop, ...)
            return self.client.containers.create(image, **kwargs).id  # type: ignore[no-any-return]

        return await self._call(create)

    async def start(self, node_id: str) -> Address:
        """Start a container; its node port is published on a host port the engine picks."""
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
        return (await self.inspect(node_id)).address

    async def restart(self, node_id: str, timeout: int = 5) -> Address:
        await self._call(self.client.api.restart, node_id, timeout=timeout)
        return (await self.inspect(node_id)).address

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

    def _info(self, cid: str, status: str, health: str, labels: dict[str, str], created: float, port: int,
              image: str) -> NodeInfo:
        return NodeInfo(id=cid, owner=labels.get(LABEL_MANAGER, ""), role=labels.get(LABEL_ROLE, Role.NODE),
                        status=_state(status), health=health, created=created, host=self.advertise_host,
                        port=port, replica_id=labels.get(LABEL_REPLICA, ""), client=labels.get(LABEL_CLIENT, ""),
                        image=image, meta=labels)

    async def inspect(self, node_id: str) -> NodeInfo:
        data = await self._call(self.client.api.inspect_container, node_id)
        state = data.get("State") or {}
        ports = ((data.get("NetworkSettings") or {}).get("Ports") or {}).get(f"{self.node_port}/tcp") or []
        labels = (data.get("Config") or {}).get("Labels") or {}
        return self._info(data["Id"], state.get("Status", "unknown"),
                          ((state.get("Health") or {}).get("Status")) or "none", labels,
                          float(labels.get(LABEL_CREATED) or _parse_time(data.get("Created", ""))),
                          int(ports[0]["HostPort"]) if ports else 0, (data.get("Config") or {}).get("Image", ""))

    async def node_secret(self, node_id: str) -> str:
        """The secret a node was created with, from the container's own config ("" if none)."""
        data = await self._call(self.client.api.inspect_container, node_id)
        for item in (data.get("Config") or {}).get("Env") or []:
            if item.startswith(SECRET_ENV + "="):
                return str(item[len(SECRET_ENV) + 1:])
        return ""

    async def list(self, owner: str, role: str | None = None) -> list[NodeInfo]:
        """One engine call: every container (any state) of owner, optionally of one role."""
        raw = await self._call(self.client.api.containers, all=True, filters={"label": _owner_filter(owner, role)})
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
            out.append(self._info(c["Id"], c.get("State", "unknown"), health, labels,
                                  float(labels.get(LABEL_CREATED) or c.get("Created") or 0), port, c.get("Image", "")))
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

    def changes(self, owner: str, stop: Callable[[], bool]) -> Iterator[None]:
        """Blocking generator, one item per container event of owner (run it in a thread)."""
        since = time.time()
        while not stop():
            with docker_errors():
                stream = self.client.api.events(since=since, decode=True,
                                                filters={"type": "container", "label": _owner_filter(owner)},
                                                until=time.time() + 1.0)
                for ev in stream:
                    since = max(since, float(ev.get("time", since)))
                    yield None
