"""The creation queue: how many new nodes this replica process starts at once, and who waits.

A burst of creations all started at once makes every one of them slow (the engine, the loop
devices and the probes share two cores); here at most ``concurrency`` run and the rest wait in
a bounded queue, served round-robin by client so one client's burst cannot push another
client's single creation back by more than one turn. Only a full queue refuses
(CreationQueueFull: 503 with Retry-After). Pool refills wait behind every client creation and
never hold the last slot, so a client finds one free as soon as a running creation ends.

Per process: replicas (and uvicorn workers) of one manager_id each have their own queue, so the
engine sees up to ``concurrency`` creations per process.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from shared import metrics
from shared.errors import CreationQueueFull

Waiter = asyncio.Future[None]


class CreationQueue:
    """At most ``concurrency`` creations at once; up to ``max_waiting`` client creations queued."""

    def __init__(self, concurrency: int, max_waiting: int, *, expected_seconds: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.concurrency = max(1, concurrency)
        self.max_waiting = max(0, max_waiting)
        self.clock = clock
        self.running = 0
        self.refilling = 0  # of running, those that fill the pool
        self.expected_seconds = expected_seconds  # a creation's recent duration (EWMA), for Retry-After
        # client -> its waiters in arrival order; the dict's order is the round-robin turn
        self._clients: OrderedDict[str, deque[Waiter]] = OrderedDict()
        self._refills: deque[Waiter] = deque()

    @property
    def waiting(self) -> int:
        """Client creations waiting for a slot (refills are not counted: they never refuse anyone)."""
        return sum(len(q) for q in self._clients.values())

    @property
    def refill_limit(self) -> int:
        """Slots refills may hold: all but one, so a client never waits for a refill to end."""
        return max(1, self.concurrency - 1)

    def retry_after(self) -> int:
        """Seconds until the queue has drained enough to take one more (at least 1)."""
        turns = (self.waiting + self.running) / self.concurrency
        return max(1, math.ceil(turns * self.expected_seconds))

    def order(self) -> list[str]:
        """The clients of the waiting creations in the order they will be served (for tests)."""
        queues = {c: list(q) for c, q in self._clients.items()}
        out: list[str] = []
        while queues:
            for client in list(queues):
                out.append(client)
                queues[client].pop(0)
                if not queues[client]:
                    del queues[client]
        return out

    @asynccontextmanager
    async def slot(self, client: str = "", *, refill: bool = False) -> AsyncIterator[None]:
        """Hold one creation slot for the body; waits its turn, or raises CreationQueueFull."""
        kind = "refill" if refill else "client"
        t0 = self.clock()
        await self._acquire(client, refill)
        metrics.CREATE_QUEUE_WAIT_SECONDS.labels(kind).observe(self.clock() - t0)
        started = self.clock()
        ok = False
        try:
            yield
            ok = True
        finally:
            if ok:  # a failed creation's time says nothing about how long the next one takes
                self.expected_seconds = 0.8 * self.expected_seconds + 0.2 * (self.clock() - started)
            self._release(refill)

    async def _acquire(self, client: str, refill: bool) -> None:
        # nobody may pass a waiter of its own kind, and a refill passes no client
        ahead = self._clients or (refill and self._refills)
        if self._free(refill) and not ahead:
            self._take(refill)
            return
        if not refill and self.waiting >= self.max_waiting:
            metrics.CREATE_QUEUE_REJECTED.inc()
            raise CreationQueueFull(
                f"the creation queue of this replica is full ({self.waiting} waiting, {self.running} being "
                f"created): retry in {self.retry_after()} s", self.retry_after())
        fut: Waiter = asyncio.get_running_loop().create_future()
        if refill:
            self._refills.append(fut)
        else:
            self._clients.setdefault(client, deque()).append(fut)
        self._gauge()
        try:
            await fut
        except BaseException:
            # cancelled (the client went away): out of the queue, or, granted meanwhile, the slot back
            if fut.done() and not fut.cancelled():
                self._release(refill)
            else:
                self._drop(fut, client, refill)
            raise

    def _free(self, refill: bool) -> bool:
        if self.running >= self.concurrency:
            return False
        return not refill or self.refilling < self.refill_limit

    def _take(self, refill: bool) -> None:
        self.running += 1
        self.refilling += refill
        self._gauge()

    def _release(self, refill: bool) -> None:
        self.running -= 1
        self.refilling -= refill
        self._grant()
        self._gauge()

    def _grant(self) -> None:
        """Hand free slots to waiters: clients first, in turn; refills only when no client waits."""
        while self._clients and self._free(False):
            client, q = next(iter(self._clients.items()))
            fut = q.popleft()
            if q:
                self._clients.move_to_end(client)  # its next one waits for every other client's turn
            else:
                del self._clients[client]
            self._take(False)
            fut.set_result(None)
        while not self._clients and self._refills and self._free(True):
            self._take(True)
            self._refills.popleft().set_result(None)

    def _drop(self, fut: Waiter, client: str, refill: bool) -> None:
        if refill:
            if fut in self._refills:
                self._refills.remove(fut)
        else:
            q = self._clients.get(client)
            if q is not None and fut in q:
                q.remove(fut)
                if not q:
                    del self._clients[client]
        self._gauge()

    def _gauge(self) -> None:
        metrics.CREATE_QUEUE_DEPTH.set(self.waiting)
        metrics.CREATES_RUNNING.set(self.running)
