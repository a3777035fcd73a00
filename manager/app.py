"""The app factory: the lifespan that owns every long-lived client and background task
of a replica, and the first stage of its graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from starlette.applications import Starlette

from checker.service import Checker
from manager.edge import errors_http
from manager.entry import HeaderLimit, ManagerApp
from manager.events.hub import EventHub
from manager.events.thaw import Thawer
from manager.mcp import route as mcp_route
from manager.proxy.http_proxy import Proxy
from manager.replica.activity import ActivityRecorder, AddressCache
from manager.replica.registry import heartbeat_loop, register
from manager.replica.runtime import Runtime
from manager.routing import build_routes
from manager.session.resolve import Resolver
from nodeops import images
from nodeops.circuit import Circuits
from nodeops.egress_agent import EgressAgent
from shared import __version__
from shared.config import Config
from shared.engines import open_backend
from shared.errors import ManagerError
from shared.models import Event, ReplicaInfo
from shared.store import Store

log = logging.getLogger(__name__)


def create_app(cfg: Config) -> ManagerApp:
    """A manager replica as an ASGI app; run it with uvicorn."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        store = Store.open(cfg)
        backend = open_backend(cfg)
        try:
            isolation = await backend.prepare(cfg.manager_id)
        except ManagerError as exc:  # a bad setting: stop here, naming it
            log.error("startup_failed error=%r", exc.detail)
            await backend.close()
            await store.close()
            raise
        limits = httpx.Limits(max_connections=cfg.proxy.max_connections,
                              max_keepalive_connections=cfg.proxy.max_connections, keepalive_expiry=30)
        http = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(cfg.proxy.timeout_seconds,
                                                                       connect=cfg.proxy.connect_timeout_seconds),
                                 follow_redirects=False, trust_env=False)
        replica = ReplicaInfo(replica_id=cfg.replica_id, manager_id=cfg.manager_id, url=cfg.advertise_url,
                              version=__version__, started_at=time.time())
        rt = Runtime(cfg=cfg, store=store, backend=backend, http=http,
                     circuits=Circuits(cfg.proxy.circuit_retry_seconds, cfg.proxy.circuit_probe_seconds),
                     cache=AddressCache(cfg.proxy.address_cache_seconds, cfg.proxy.unknown_cookie_cache_seconds),
                     activity=ActivityRecorder(store, cfg.proxy.activity_flush_seconds), replica=replica)
        rt.isolation = isolation
        app.state.rt = rt
        app.state.resolver = resolver = Resolver(rt)
        app.state.proxy = Proxy(rt, resolver)
        thawer = Thawer(rt)
        agent = app.state.egress_agent = EgressAgent(rt) if cfg.egress.enforce else None
        if agent is not None:
            rt.egress_in_force = agent.in_force

        def on_event(ev: Event) -> None:
            thawer(ev)
            if agent is not None:
                agent.on_event(ev)

        hub = app.state.hub = EventHub(store, rt.cache, on_event, manager_id=cfg.manager_id,
                                       busy=rt.activity.busy_managers, replica_ttl=cfg.cluster.replica_ttl_seconds)
        rt.activity.on_quiet_work = hub.work_started
        await register(rt)
        checker = Checker(rt) if cfg.builtin_monitor else None
        app.state.checker = checker
        tasks = [asyncio.create_task(coro, name=name) for name, coro in (
            ("heartbeat", heartbeat_loop(rt)),
            ("activity", rt.activity.run()),
            ("events", hub.run()),
            ("image", images.keep_present(rt)),
        )]
        if checker is not None:
            tasks.append(asyncio.create_task(checker.run(), name="checker"))
        if agent is not None:
            tasks.append(asyncio.create_task(agent.run(), name="egress"))
        log.info("replica_started replica_id=%s manager_id=%s url=%s", cfg.replica_id, cfg.manager_id,
                 cfg.advertise_url)
        try:
            yield
        finally:
            await begin_shutdown(app)
            hub.stop()
            for t in tasks:
                t.cancel()
            # a task that does not end on its cancel would hold the stop forever: name it and go on
            done, pending = await asyncio.wait(tasks, timeout=10)
            for t in done:  # retrieved, as gather did: an error of theirs was logged where it happened
                if not t.cancelled():
                    t.exception()
            if pending:
                log.warning("shutdown_tasks_pending tasks=%s", ",".join(sorted(t.get_name() for t in pending)))
            with contextlib.suppress(Exception):
                await rt.activity.flush()
            await mcp_route.close(app)
            app.state.proxy.close()
            rt.circuits.close()
            await http.aclose()
            await rt.close_http()
            await backend.close()
            await store.close()
            log.info("replica_stopped replica_id=%s", cfg.replica_id)

    app = Starlette(routes=build_routes(cfg), lifespan=lifespan, exception_handlers=errors_http.HANDLERS)
    app.state.cfg = cfg
    app.state.shutting_down = False
    app.add_middleware(HeaderLimit, limit=cfg.proxy.max_header_bytes)
    return ManagerApp(app, cfg)


async def begin_shutdown(app: Starlette) -> None:
    """First stage of a graceful stop: leave the registry and hand the lease over at once."""
    if app.state.shutting_down:
        return
    app.state.shutting_down = True
    rt: Runtime | None = getattr(app.state, "rt", None)
    if rt is None:
        return
    async with rt.registry_lock:
        rt.stopping = True
        with contextlib.suppress(ManagerError):
            await rt.store.deregister(rt.replica.replica_id)
    checker: Any = app.state.checker
    if checker is not None:
        await checker.stop()
