"""The creation queue: how many new nodes an engine starts at once, and who waits.

A burst of creations all started at once makes every one of them slow (the engine, the loop
devices and the probes share the host's cores); here at most ``creation.concurrency`` run on the
engine (the manager_id) and the rest wait in a bounded queue, served round-robin by client so
one client's burst cannot push another client's single creation back by more than one turn.
Only a full queue refuses (CreationQueueFull: 503 with Retry-After). Pool refills wait behind
every client creation and never hold the last slot, so a client finds one free as soon as a
running creation ends.

The slots and the queue are the engine's, held in Redis (shared/store/creations.py), so every
replica process of a manager_id (uvicorn workers, replicas) shares one bound; each slot and each
place in the queue is leased (``creation.lease_seconds``) and renewed by its process, so a process
that is killed frees them. This is the process's side: it takes a slot, waits for its turn
(woken at once when a slot given back here went to it, by polling otherwise: often near the
queue's head, seldom far from it), renews what it holds and gives it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from shared import metrics
from shared.errors import CreationQueueFull, ManagerError
from shared.store import Store

log = logging.getLogger(__name__)
POLL_SECONDS = 0.05  # the queue's head asks this often whether a slot went to it in another process
MAX_POLL_SECONDS = 0.5  # a waiter far back asks no less often than this
REFILL_POLL_SECONDS = 0.25  # a refill waits for no one in particular: it asks now and then


class CreationQueue:
    """At most ``concurrency`` creations at once on the engine; up to ``max_waiting`` client creations queued."""

    def __init__(self, store: Store, manager_id: str, concurrency: int, max_waiting: int, *,
                 lease_seconds: float = 10.0, expected_seconds: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.manager_id = manager_id
        self.concurrency = max(1, concurrency)
        self.max_waiting = max(0, max_waiting)
        self.lease_seconds = max(lease_seconds, 0.5)
        self.clock = clock
        self.expected_seconds = expected_seconds  # a creation's recent duration (EWMA), for Retry-After
        self.waiting = 0  # the engine's waiting client creations, as last seen
        self.running = 0  # the engine's held slots, as last seen
        self.local_waiting = 0  # of them, this process's
        self.local_running = 0
        self._tag = f"{os.getpid()}:{uuid.uuid4().hex[:8]}"  # names this process's members
        self._held: set[str] = set()
        self._wake: dict[str, asyncio.Event] = {}  # waiting member -> set when a release here granted it
        self._granted: set[str] = set()
        self._renewer: asyncio.Task[None] | None = None

    def retry_after(self) -> int:
        """Seconds until the queue has drained enough to take one more (at least 1)."""
        turns = (self.waiting + self.running) / self.concurrency
        return max(1, math.ceil(turns * self.expected_seconds))

    @asynccontextmanager
    async def slot(self, client: str = "", *, refill: bool = False) -> AsyncIterator[None]:
        """Hold one creation slot of the engine for the body; waits its turn, or raises CreationQueueFull."""
        kind = "refill" if refill else "client"
        member = f"{self._tag}:{uuid.uuid4().hex[:12]}"
        t0 = self.clock()
        await self._acquire(member, client, refill)
        metrics.CREATE_QUEUE_WAIT_SECONDS.labels(kind).observe(self.clock() - t0)
        started = self.clock()
        ok = False
        try:
            yield
            ok = True
        finally:
            if ok:  # a failed creation's time says nothing about how long the next one takes
                self.expected_seconds = 0.8 * self.expected_seconds + 0.2 * (self.clock() - started)
            self._held.discard(member)
            self.local_running -= 1
            self._gauge()
            await asyncio.shield(self._give_back(member))

    async def _acquire(self, member: str, client: str, refill: bool) -> None:
        wake = self._wake[member] = asyncio.Event()
        queued = False
        try:
            state, position = await self._ask(member, client, refill)
            if state < 0:
                metrics.CREATE_QUEUE_REJECTED.inc()
                raise CreationQueueFull(
                    f"the creation queue of engine {self.manager_id} is full ({self.waiting} waiting, "
                    f"{self.running} being created): retry in {self.retry_after()} s", self.retry_after())
            if state == 0 and not refill:  # refills never refuse anyone: not counted as waiting
                queued = True
                self.local_waiting += 1
                self._gauge()
            while state == 0:
                wait = REFILL_POLL_SECONDS if refill else min(MAX_POLL_SECONDS, POLL_SECONDS * (1 + position))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), wait)
                if member in self._granted:  # a slot given back in this process went to it
                    break
                # a place whose lease lapsed (this process stalled) is taken anew: full now is a refusal too
                state, position = await self._ask(member, client, refill)
                if state < 0:
                    metrics.CREATE_QUEUE_REJECTED.inc()
                    raise CreationQueueFull(f"the creation queue of engine {self.manager_id} is full: retry in "
                                            f"{self.retry_after()} s", self.retry_after())
        except BaseException:
            # refused, cancelled (the client went away) or Redis failed: out of the queue, or, granted
            # meanwhile, the slot back (releasing an unknown member is a no-op)
            await asyncio.shield(self._give_back(member))
            raise
        finally:
            self._wake.pop(member, None)
            self._granted.discard(member)
            if queued:
                self.local_waiting -= 1
                self._gauge()
        self._held.add(member)
        self.local_running += 1
        self._gauge()
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew())

    async def _ask(self, member: str, client: str, refill: bool) -> tuple[int, int]:
        state, self.waiting, self.running, position = await self.store.creation_slot(
            self.manager_id, member, client, refill, self.concurrency, self.max_waiting, self.lease_seconds)
        return state, position

    async def _give_back(self, member: str) -> None:
        try:
            granted = await self.store.release_creation_slots(self.manager_id, [member], self.concurrency,
                                                              self.lease_seconds)
        except ManagerError as exc:  # its lease lapses instead
            log.warning("creation_slot_release_failed manager_id=%s error=%s", self.manager_id, exc.detail)
            return
        for m in granted:
            if m in self._wake:
                self._granted.add(m)
                self._wake[m].set()

    async def _renew(self) -> None:
        """Keep this process's slots leased while it holds any (a killed process's lapse)."""
        while self._held:
            await asyncio.sleep(self.lease_seconds / 3)
            if not self._held:
                break
            try:
                await self.store.renew_creation_slots(self.manager_id, list(self._held), self.lease_seconds)
            except ManagerError as exc:
                log.warning("creation_slot_renew_failed manager_id=%s error=%s", self.manager_id, exc.detail)

    def _gauge(self) -> None:
        metrics.CREATE_QUEUE_DEPTH.set(self.local_waiting)
        metrics.CREATES_RUNNING.set(self.local_running)
