"""Resumable SSE streams of the 2025-11-25 revision, kept in Redis so any replica resumes them.

A tool call that asked for progress answers with an SSE stream. Its producer runs apart from
the HTTP response: every event is appended to a Redis stream (the SSE id is
``<stream id>_<entry id>``) and handed to the live response; a client that drops the stream
does not stop the call, and a GET with ``Last-Event-ID`` on any replica replays what followed
that event and waits for the rest. While the call runs its replica renews a short lease; a
resumer that finds the lease gone and no final event knows that replica died and ends the
stream with an error instead of waiting for an answer that cannot come.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from manager.mcp import wire
from manager.mcp.sessions import McpSession
from manager.replica.runtime import Runtime
from shared import metrics
from shared.errors import ManagerError

log = logging.getLogger(__name__)

EVENT_ID = re.compile(r"^([0-9a-z]{16})_([0-9]{1,20}-[0-9]{1,20})$")
HOLD_SECONDS = 3.0  # the producer's lease: renewed every third of it
KEEPALIVE_SECONDS = 15.0
PRIMING, MESSAGE, FINAL = "p", "m", "f"
GET_PREFIX = "g"  # stream ids of GET streams, which carry no events of their own

Producer = Callable[[Callable[[dict[str, Any]], Awaitable[None]]], Awaitable[dict[str, Any]]]


class Streams:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.cfg = rt.cfg.mcp
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, sess: McpSession, request_id: Any, produce: Producer) -> AsyncIterator[bytes]:
        """Run produce(notify) to its JSON-RPC response as a stream; the frames while the client listens."""
        store, h, sid = self.rt.store, sess.token_hash, secrets.token_hex(8)
        frames: asyncio.Queue[bytes | None] = asyncio.Queue()
        ttl = self.cfg.stream_ttl_seconds

        async def emit(payload: str, kind: str) -> None:
            eid = await store.mcp.stream_add(h, sid, payload, kind, ttl)
            frames.put_nowait(wire.sse("" if kind == PRIMING else payload, f"{sid}_{eid}",
                                       self.cfg.retry_ms if kind == PRIMING else None))

        await store.mcp.stream_hold(h, sid, self.rt.replica.replica_id, HOLD_SECONDS)
        await emit(wire.dumps({"id": request_id}), PRIMING)  # sent with empty data; kept for resumers

        async def run() -> None:
            holder = asyncio.create_task(self._hold(h, sid))
            try:
                answer = await produce(lambda msg: emit(wire.dumps(msg), MESSAGE))
                await emit(wire.dumps(answer), FINAL)
            except ManagerError as exc:  # Redis went away mid-call: the live client still gets an answer
                log.warning("mcp_stream_lost stream=%s error=%r", sid, exc.detail)
                frames.put_nowait(wire.sse(wire.dumps(wire.error(request_id, wire.RpcError(
                    wire.SERVER_ERROR, exc.detail, status=exc.status_code)))))
            finally:
                holder.cancel()
                with contextlib.suppress(ManagerError):
                    await store.mcp.stream_let_go(h, sid)
                frames.put_nowait(None)

        task = asyncio.create_task(run())
        self._tasks.add(task)  # detached from the response: a dropped stream does not stop the call
        task.add_done_callback(self._tasks.discard)
        return self._live(frames)

    async def _live(self, frames: asyncio.Queue[bytes | None]) -> AsyncIterator[bytes]:
        """The frames as they come; ends early when held long enough or this replica stops (the
        client resumes with Last-Event-ID elsewhere while the call goes on here)."""
        close_after = self.cfg.stream_close_seconds
        deadline = time.monotonic() + close_after if close_after > 0 else None
        while not self.rt.stopping:
            timeout = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if timeout <= 0:
                return
            try:
                frame = await asyncio.wait_for(frames.get(), timeout)
            except TimeoutError:
                continue
            if frame is None:
                return
            yield frame

    async def _hold(self, h: str, sid: str) -> None:
        while True:
            await asyncio.sleep(HOLD_SECONDS / 3)
            with contextlib.suppress(ManagerError):
                await self.rt.store.mcp.stream_hold(h, sid, self.rt.replica.replica_id, HOLD_SECONDS)

    async def resume(self, sess: McpSession, last_event_id: str) -> AsyncIterator[bytes] | None:
        """The events after last_event_id and the rest as they come, or None for an id this session never had."""
        m = EVENT_ID.match(last_event_id)
        if m is None:
            return None
        sid, after = m.groups()
        if sid.startswith(GET_PREFIX):
            return self.listen(sess, sid)
        if not await self.rt.store.mcp.stream_exists(sess.token_hash, sid):
            return None
        return self._tail(sess.token_hash, sid, after)

    async def _tail(self, h: str, sid: str, after: str) -> AsyncIterator[bytes]:
        store = self.rt.store
        rows = await store.mcp.stream_read(h, sid, "0-0", None)
        request_id = next((_request_id(d) for _, d, k in rows if k == PRIMING), None)
        pending = [r for r in rows if _after(r[0], after)]
        last, quiet = after, time.monotonic()
        while not self.rt.stopping:  # stopping: the client resumes from `last` elsewhere
            for eid, data, kind in pending:
                last = eid
                if kind != PRIMING:
                    yield wire.sse(data, f"{sid}_{eid}")
                if kind == FINAL:
                    metrics.MCP_RESUMES.labels("complete").inc()
                    return
            if pending:
                quiet = time.monotonic()
            elif not await store.mcp.stream_held(h, sid):
                pending = await store.mcp.stream_read(h, sid, last, None)  # it may have ended just now
                if pending:
                    continue
                metrics.MCP_RESUMES.labels("lost").inc()
                yield wire.sse(wire.dumps(wire.error(request_id, wire.RpcError(
                    wire.SERVER_ERROR, "the replica running this call stopped before it answered; "
                                       "whether the tool ran is unknown"))))
                return
            elif time.monotonic() - quiet > KEEPALIVE_SECONDS:
                quiet = time.monotonic()
                yield b": keep-alive\n\n"
            pending = await store.mcp.stream_read(h, sid, last, 1000)

    def new_listen_id(self) -> str:
        return GET_PREFIX + secrets.token_hex(8)[:15]

    async def listen(self, sess: McpSession, sid: str) -> AsyncIterator[bytes]:
        """The GET stream: the server sends nothing unprompted, so it primes, keeps alive and ends
        when the session does (or this replica stops: the client reconnects elsewhere)."""
        yield wire.sse("", f"{sid}_0-0", self.cfg.retry_ms)
        waited = 0.0
        while not self.rt.stopping:
            await asyncio.sleep(1.0)
            waited += 1.0
            if waited % 5 == 0 and await self.rt.store.mcp.session_get(sess.token_hash) is None:
                return
            if waited % KEEPALIVE_SECONDS == 0:
                yield b": keep-alive\n\n"

    async def close(self, grace: float) -> None:
        """Let running calls finish (their clients resume elsewhere and read the answers from
        Redis) for up to grace seconds, then cancel them."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace)
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _request_id(data: str) -> Any:
    try:
        return json.loads(data).get("id")
    except (ValueError, AttributeError):
        return None


def _after(eid: str, ref: str) -> bool:
    a, b = (tuple(int(x) for x in i.split("-")) for i in (eid, ref))
    return a > b
