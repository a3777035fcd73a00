"""Blocking wrappers: the async classes run on a private event loop thread."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from typing import Any

from toolserver_manager.admin import AsyncAdmin
from toolserver_manager.errors import ForkIncomplete, InvalidSession
from toolserver_manager.events import EventStream
from toolserver_manager.models import (
    AvailableTools,
    CookieInfo,
    Download,
    DrainState,
    Engines,
    Event,
    Lease,
    NodeDetail,
    NodeList,
    Replica,
    SnapshotInfo,
    ToolResult,
)
from toolserver_manager.sessions import AsyncSession
from toolserver_manager.transport import DEFAULT_URL, Dest, Source, T


class Portal:
    """A private event loop on a daemon thread that runs the async client's coroutines."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="toolserver-client", daemon=True)
        self._thread.start()

    def call(self, coro: Awaitable[T]) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]
        try:
            return fut.result()
        except BaseException:
            fut.cancel()
            raise

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class SyncEventStream:
    """Blocking iterator over an ``EventStream``; ``close()`` (or ``with``) ends it."""

    def __init__(self, portal: Portal, stream: EventStream) -> None:
        self._portal = portal
        self.stream = stream

    @property
    def last_event_id(self) -> str | None:
        return self.stream.last_event_id

    @property
    def handshake(self) -> Any:
        return self.stream.handshake

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        try:
            return self._portal.call(self.stream.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        self._portal.call(self.stream.aclose())

    def start(self) -> SyncEventStream:
        """Open the socket and wait for the handshake."""
        self._portal.call(self.stream.start())
        return self

    def __enter__(self) -> SyncEventStream:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncBase:
    _a: Any

    def __init__(self, factory: Callable[[], Any]) -> None:
        self._portal = Portal()

        async def make() -> Any:
            return factory()

        self._a = self._portal.call(make())

    def _run(self, coro: Awaitable[T]) -> T:
        return self._portal.call(coro)

    @property
    def url(self) -> str:
        return str(self._a.url)

    def shutdown(self) -> None:
        """Close the HTTP connections and the private loop (the node is left as it is)."""
        if self._portal.loop.is_closed():
            return
        try:
            self._run(self._a.shutdown())
        finally:
            self._portal.stop()


class Session(SyncBase):
    """Blocking ``AsyncSession``: same arguments, same methods without ``await``."""

    def __init__(self, url: str = DEFAULT_URL, **kwargs: Any) -> None:
        super().__init__(lambda: AsyncSession(url, **kwargs))

    @classmethod
    def create(cls, url: str = DEFAULT_URL, **kwargs: Any) -> Session:
        """A started session (its node is ready)."""
        s = cls(url, **kwargs)
        try:
            s.start()
        except BaseException:
            s.shutdown()
            raise
        return s

    @property
    def node_id(self) -> str | None:
        return self._a.node_id  # type: ignore[no-any-return]

    @property
    def info(self) -> CookieInfo | None:
        return self._a.info  # type: ignore[no-any-return]

    def __enter__(self) -> Session:
        if not self.node_id:
            try:
                self.start()
            except BaseException:
                self.shutdown()
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.node_id and self._a.on_exit != "keep":
                with contextlib.suppress(InvalidSession):
                    self.release() if self._a.on_exit == "release" else self.close()
        finally:
            self.shutdown()

    def start(self) -> CookieInfo:
        """Create the node (``POST /get_cookie``)."""
        return self._run(self._a.start())

    def close(self) -> str:
        """Stop the node (``/close_session``)."""
        return self._run(self._a.close())

    def reconnect(self) -> str:
        """Restart the node and wait until it answers."""
        return self._run(self._a.reconnect())

    def release(self) -> str:
        """Kill and remove the node; the session is invalid afterwards."""
        return self._run(self._a.release())

    def fork(self, count: int = 1) -> list[Session]:
        """Copy this session into ``count`` new ones, ready (see ``AsyncSession.fork``)."""
        try:
            made = self._run(self._a.fork(count))
        except ForkIncomplete as exc:
            exc.sessions = [Session._wrap(a) for a in exc.sessions]
            raise
        return [Session._wrap(a) for a in made]

    @classmethod
    def _wrap(cls, a: AsyncSession) -> Session:
        """A blocking Session on a new loop, for the same node and settings as ``a``."""
        return cls(a.url, node_id=a.node_id, **a._kwargs)

    def snapshot(self, name: str) -> SnapshotInfo:
        """Save this session's workspace as the snapshot ``name``."""
        return self._run(self._a.snapshot(name))

    def snapshots(self) -> list[SnapshotInfo]:
        """The snapshots this client keeps."""
        return self._run(self._a.snapshots())

    def delete_snapshot(self, name: str) -> None:
        """Delete one of this client's snapshots."""
        self._run(self._a.delete_snapshot(name))

    def execute_tool(self, tool_name: str, arguments: dict[str, Any] | str | None = None,
                     env_name: str | None = None, *, timeout: float | None = None) -> ToolResult:
        """Run a tool on the node."""
        return self._run(self._a.execute_tool(tool_name, arguments, env_name, timeout=timeout))

    def get_available_tools(self) -> AvailableTools:
        """The node's envs and tools."""
        return self._run(self._a.get_available_tools())

    def call(self, path: str, payload: dict[str, Any] | None = None) -> Any:
        """POST JSON to any proxied node path."""
        return self._run(self._a.call(path, payload))

    def upload_file(self, source: Source, remote_name: str | None = None) -> str:
        """Stream a file into the workspace."""
        return self._run(self._a.upload_file(source, remote_name))

    def download_file(self, file_path: str, dest: Dest, *, file_type: str | None = None) -> Download:
        """Stream a workspace file to ``dest``."""
        return self._run(self._a.download_file(file_path, dest, file_type=file_type))

    def download_workspace(self, dest: Dest) -> Download:
        """Stream the workspace zip to ``dest``."""
        return self._run(self._a.download_workspace(dest))

    def watch_events(self, last_event_id: str | None = None, **kwargs: Any) -> SyncEventStream:
        """This session's node events, as a blocking iterator."""
        return SyncEventStream(self._portal, self._a.watch_events(last_event_id, **kwargs))


ToolServer = Session


class Admin(SyncBase):
    """Blocking ``AsyncAdmin``."""

    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, **kwargs: Any) -> None:
        super().__init__(lambda: AsyncAdmin(url, token, **kwargs))

    def __enter__(self) -> Admin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def list_nodes(self, **filters: Any) -> NodeList:
        """Node records (filters: manager_id, status, min_idle_seconds, limit, offset)."""
        return self._run(self._a.list_nodes(**filters))

    def inspect_node(self, node_id: str) -> NodeDetail:
        return self._run(self._a.inspect_node(node_id))

    def release_nodes(self, *node_ids: str) -> dict[str, str]:
        return self._run(self._a.release_nodes(*node_ids))

    def fork_node(self, node_id: str, count: int = 1) -> list[str]:
        return self._run(self._a.fork_node(node_id, count))

    def snapshot_node(self, node_id: str, name: str) -> SnapshotInfo:
        return self._run(self._a.snapshot_node(node_id, name))

    def snapshots(self) -> list[SnapshotInfo]:
        return self._run(self._a.snapshots())

    def delete_snapshot(self, name: str, client: str | None = None) -> None:
        self._run(self._a.delete_snapshot(name, client))

    def replicas(self) -> list[Replica]:
        return self._run(self._a.replicas())

    def leases(self) -> list[Lease]:
        return self._run(self._a.leases())

    def drain(self, manager_id: str, on: bool = True) -> DrainState:
        return self._run(self._a.drain(manager_id, on))

    def engines(self) -> Engines:
        return self._run(self._a.engines())

    def config(self) -> dict[str, Any]:
        return self._run(self._a.config())

    def watch_events(self, manager_id: str | None = None, last_event_id: str | None = None,
                     **kwargs: Any) -> SyncEventStream:
        """Every node's events (or one manager_id's), as a blocking iterator."""
        return SyncEventStream(self._portal, self._a.watch_events(manager_id, last_event_id, **kwargs))
