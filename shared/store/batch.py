"""Reads of one kind issued in the same turn of the event loop share one pipeline.

A burst of requests with made-up cookies asks Redis for a thousand records at once. One
connection each drained the pool: behind 3,000 event sockets lagging the loop, the tail of the
burst waited past the pool's timeout and got 503 where 403 was due (seen in a full run). Joined,
the burst takes a connection per loop turn, and the same key asked twice is read once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

# a pipeline this long still answers in well under a millisecond; longer bursts take several
MAX_BATCH = 512


class BatchedHgetall:
    """HGETALL whose concurrent callers share pipelines; each caller gets its key's reply or the error."""

    def __init__(self, redis: Any, errors: Callable[[], Any]) -> None:
        self.redis = redis
        self.errors = errors  # the store's mapping of transport errors, entered around each pipeline
        self._waiting: dict[str, list[asyncio.Future[dict[bytes, bytes]]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # strong references until each pipeline ends

    def __call__(self, key: str) -> Awaitable[dict[bytes, bytes]]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[dict[bytes, bytes]] = loop.create_future()
        if not self._waiting:
            loop.call_soon(self._flush)
        self._waiting.setdefault(key, []).append(fut)
        return fut

    def _flush(self) -> None:
        waiting, self._waiting = self._waiting, {}
        keys = list(waiting)
        for i in range(0, len(keys), MAX_BATCH):
            part = {k: waiting[k] for k in keys[i:i + MAX_BATCH]}
            task = asyncio.get_running_loop().create_task(self._read(part))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _read(self, waiting: dict[str, list[asyncio.Future[dict[bytes, bytes]]]]) -> None:
        try:
            with self.errors():
                async with self.redis.pipeline(transaction=False) as p:
                    for key in waiting:
                        p.hgetall(key)
                    replies = await p.execute()
        except BaseException as exc:  # every caller still waiting hears it (a caller may have left)
            for futs in waiting.values():
                for f in futs:
                    if f.done():
                        continue
                    if isinstance(exc, Exception):
                        f.set_exception(exc)
                    else:  # the pipeline's task was cancelled (the loop closing): so are its callers
                        f.cancel()
            if not isinstance(exc, Exception):
                raise
            return
        for futs, reply in zip(waiting.values(), replies, strict=True):
            for f in futs:
                if not f.done():  # its request may have gone (a client that hung up)
                    f.set_result(reply)
