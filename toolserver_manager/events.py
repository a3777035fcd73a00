"""The /ws/events stream: handshake, keep-alive, resume from the last event id."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Any

import msgspec
import websockets
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from toolserver_manager.errors import (
    ConnectionFailed,
    EventStreamError,
    InvalidSession,
    ToolServerError,
    Unauthorized,
    detail_of,
    error_for,
)
from toolserver_manager.models import Event

if TYPE_CHECKING:
    from toolserver_manager.transport import AsyncBase


class Watch:
    """What the background reader of an EventStream shares with it (never the stream itself,
    so a dropped stream can be garbage-collected and its reader cancelled)."""

    def __init__(self, base: AsyncBase, query: dict[str, str], headers: dict[str, str], resume_id: str | None,
                 ping_interval: float | None, resume_attempts: int, open_timeout: float, buffer: int) -> None:
        self.base = base
        self.query = query
        self.headers = headers
        self.resume_id = resume_id  # the last event received: where a reconnection resumes
        self.ping_interval = ping_interval
        self.resume_attempts = resume_attempts
        self.open_timeout = open_timeout
        self.queue: asyncio.Queue[Event | BaseException | None] = asyncio.Queue(buffer)
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.handshake: Any = None
        self.connections = 0
        self.pending_pongs = 0

    def url(self) -> str:
        q = dict(self.query)
        if self.resume_id:
            q["last_event_id"] = self.resume_id
        return self.base._ws_url("/ws/events", q)

    async def connect(self) -> Any:
        try:
            return await websockets.connect(self.url(), additional_headers=self.headers,
                                            open_timeout=self.open_timeout,
                                            proxy=True if self.base.trust_env else None)
        except InvalidStatus as exc:
            resp = exc.response
            raise error_for(resp.status_code, detail_of(resp.body or b""), "admin") from exc
        except (TimeoutError, OSError, InvalidHandshake) as exc:
            raise ConnectionFailed(f"cannot connect to {self.base.url}/ws/events: "
                                   f"{exc or type(exc).__name__}") from exc

    async def shake(self, ws: Any) -> None:
        """Read the first message: ``{"status":"connect","success":true,...}`` or raise."""
        try:
            raw = await asyncio.wait_for(ws.recv(), self.open_timeout)
            msg = json.loads(raw)
        except (TimeoutError, ConnectionClosed, ValueError) as exc:
            raise EventStreamError(f"no handshake from /ws/events: {exc!r}") from exc
        if not isinstance(msg, dict) or msg.get("status") != "connect":
            raise EventStreamError(f"unexpected first message: {str(raw)[:200]}")
        if not msg.get("success"):
            text = str(msg.get("message") or "watch refused")
            if text.startswith("invalid node_id"):
                raise InvalidSession(text)
            if "token" in text:
                raise Unauthorized(text)
            raise EventStreamError(text)
        self.handshake = msg.get("data")

    async def ping(self, ws: Any) -> None:
        self.pending_pongs += 1
        await ws.send('{"type":"ping"}')

    async def pinger(self, ws: Any, every: float) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await asyncio.sleep(every)
                await self.ping(ws)

    def fail(self, exc: BaseException | None) -> None:
        """End the stream: a handshake error goes to start(), a later one to the consumer."""
        if exc is not None and not self.ready.done():
            self.ready.set_exception(exc)
            return
        if not self.ready.done():
            self.ready.set_result(None)
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(exc)
        if self.queue.full():  # make room for the end marker: the consumer must learn the stream ended
            with contextlib.suppress(asyncio.QueueEmpty):
                self.queue.get_nowait()
            self.queue.put_nowait(exc)

    async def run(self) -> None:
        """Connect, read, answer keep-alives, and resume after drops; runs as a task."""
        failures = 0
        while True:
            try:
                ws = await self.connect()
            except ToolServerError as exc:
                if self.connections == 0 or failures >= self.resume_attempts:
                    self.fail(exc)
                    return
                failures += 1
                await asyncio.sleep(self.base._delay(failures - 1))
                continue
            pinger: asyncio.Task[None] | None = None
            try:
                try:
                    await self.shake(ws)
                except ToolServerError as exc:
                    # on a resume, a node that is gone now simply ends its session's stream
                    self.fail(None if self.connections and isinstance(exc, InvalidSession) else exc)
                    return
                self.connections += 1
                failures = 0
                self.pending_pongs = 0
                if not self.ready.done():
                    self.ready.set_result(None)
                if self.ping_interval:
                    pinger = asyncio.create_task(self.pinger(ws, self.ping_interval))
                async for raw in ws:
                    try:
                        msg = json.loads(raw)
                    except ValueError:
                        continue
                    kind = msg.get("type") if isinstance(msg, dict) else None
                    if kind == "pong":
                        if self.pending_pongs > 0:
                            self.pending_pongs -= 1  # the answer to our ping
                        else:
                            await self.ping(ws)  # the server's keep-alive: show that we are here
                    elif kind == "event":
                        ev = msgspec.convert(msg, Event, strict=False)
                        if ev.id:
                            self.resume_id = ev.id
                        await self.queue.put(ev)
                    elif kind == "gap":
                        await self.queue.put(Event(event="gap", detail=str(msg.get("message", ""))))
                    elif kind == "error":
                        self.fail(EventStreamError(str(msg.get("message", msg))))
                        return
            except ConnectionClosed:
                pass
            finally:
                if pinger is not None:
                    pinger.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await pinger
                with contextlib.suppress(Exception):
                    await ws.close()
            # the server closed the socket (shutdown, slow reader, silence): resume after the last event
            if failures >= self.resume_attempts:
                self.fail(None if self.resume_attempts == 0 else ConnectionFailed(
                    f"event stream closed and could not be resumed after {failures} attempts"))
                return
            failures += 1
            await asyncio.sleep(self.base._delay(failures - 1))


class EventStream:
    """Async iterator of ``Event`` over ``/ws/events``, read by a background task that answers the
    server's keep-alives and resumes after drops with ``last_event_id``.

    ``async with`` waits for the handshake (raising on ``success: false``) and closes the socket on exit.
    """

    def __init__(self, base: AsyncBase, query: dict[str, str], headers: dict[str, str], *,
                 last_event_id: str | None = None, ping_interval: float | None = 20.0,
                 resume_attempts: int = 5, open_timeout: float = 10.0, buffer: int = 1000) -> None:
        self._args = (base, {k: v for k, v in query.items() if v}, headers, last_event_id, ping_interval,
                      resume_attempts, open_timeout, buffer)
        self._watch: Watch | None = None
        self._task: asyncio.Task[None] | None = None
        self._last = last_event_id
        self._gen = self._consume()

    @property
    def last_event_id(self) -> str | None:
        """The id of the last event handed out: pass it to a new watch to resume after it."""
        return self._last

    @property
    def handshake(self) -> Any:
        """The handshake's ``data``: the node record (session watch) or the admin scope."""
        return self._watch.handshake if self._watch else None

    @property
    def connections(self) -> int:
        """How many times the socket was opened (1 + resumes)."""
        return self._watch.connections if self._watch else 0

    async def start(self) -> EventStream:
        """Open the socket and wait for the handshake (iteration does this by itself)."""
        if self._watch is None:
            self._watch = Watch(*self._args)
            self._task = asyncio.create_task(self._watch.run(), name="toolserver-events")
        await asyncio.shield(self._watch.ready)
        return self

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._gen

    async def __anext__(self) -> Event:
        return await self._gen.__anext__()

    async def _consume(self) -> AsyncGenerator[Event, None]:
        try:
            await self.start()
            assert self._watch is not None
            while True:
                item = await self._watch.queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                if item.id:
                    self._last = item.id
                yield item
        finally:
            await self._stop()

    async def _stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def aclose(self) -> None:
        """Close the socket and end the iteration."""
        await self._gen.aclose()
        await self._stop()

    async def __aenter__(self) -> EventStream:
        try:
            return await self.start()
        except BaseException:
            await self.aclose()
            raise

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
