"""The long-lived clients one replica shares between requests and background tasks."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import httpx

from manager.activity import ActivityRecorder, AddressCache
from shared.config import Config
from shared.docker_backend import DockerBackend
from shared.models import ReplicaInfo
from shared.store import Store


@dataclass
class Runtime:
    cfg: Config
    store: Store
    backend: DockerBackend
    http: httpx.AsyncClient
    cache: AddressCache
    activity: ActivityRecorder
    replica: ReplicaInfo
    inflight: int = 0  # proxied requests in progress
    stopping: bool = False  # set at the stop signal: the heartbeat must not re-register
    registry_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # heartbeat vs deregistration

    @property
    def manager_id(self) -> str:
        return self.cfg.manager_id
