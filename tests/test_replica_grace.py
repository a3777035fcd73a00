"""A live replica whose registry entry lapsed for a moment keeps the node it is creating.

Two replicas of one manager_id on the real engine and Redis: A holds the checker lease, B creates
a node and is stopped (SIGSTOP, as a stalled event loop or a slow Redis would hold it) long
enough for its heartbeat entry to expire. The checker must not take B for dead at the first pass
that misses it: a 503 "its container was removed" in the Kubernetes deployment test came from
this (two pods, one engine, right after install).
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import httpx
import redis

from tests.conftest import wait_for

TTL = 4.0  # replica_ttl_seconds: B stays stopped past it, but not past it twice


def creating_by(r: redis.Redis, prefix: str, manager_id: str, replica_id: str) -> list[str]:
    """Ids of the records replica_id is creating."""
    out = []
    for m in r.smembers(f"{prefix}:mgr:{manager_id}:nodes"):
        node_id = m.decode()
        if node_id.startswith("pending:"):
            continue
        rec = r.hgetall(f"{prefix}:node:{node_id}")
        if rec.get(b"replica_id", b"").decode() == replica_id and rec.get(b"status") == b"creating":
            out.append(node_id)
    return out


class Creation:
    """A client's get_cookie on a replica, in a thread, and the creating record it made."""

    def __init__(self, r: redis.Redis, prefix: str, manager_id: str, m: Any, timeout: float) -> None:
        self.r, self.prefix, self.m, self.timeout = r, prefix, m, timeout
        self.out: dict[str, Any] = {}
        self.thread = threading.Thread(target=self._create)
        self.thread.start()
        (self.node_id,) = wait_for(lambda: creating_by(r, prefix, manager_id, m.replica_id), timeout=60,
                                   interval=0.005, what=f"{m.replica_id}'s creating record")

    def _create(self) -> None:
        with httpx.Client(base_url=self.m.url, timeout=self.timeout) as c:
            self.out["resp"] = c.post("/get_cookie")

    def status(self) -> bytes | None:
        """The record's status now (None: removed)."""
        return self.r.hget(f"{self.prefix}:node:{self.node_id}", "status")  # type: ignore[return-value]

    def check_served(self) -> None:
        """The client got the node it was creating, and the node answers as a running session."""
        self.thread.join(timeout=self.timeout)
        r = self.out["resp"]
        assert r.status_code == 200, r.text
        assert r.cookies["node_id"] == self.node_id
        with httpx.Client(base_url=self.m.url, cookies={"node_id": self.node_id}, timeout=30) as c:
            assert c.post("/get_available_tools").status_code == 200
        assert self.status() == b"running"


def test_a_replica_stalled_past_its_ttl_keeps_its_creation(start_manager, redis_client: redis.Redis, prefix: str,
                                                           manager_id: str) -> None:
    cluster = {"heartbeat_seconds": 0.5, "replica_ttl_seconds": TTL}
    a = start_manager("a", cluster=cluster, checker={"interval_seconds": 0.3, "lease_ttl_seconds": 3})
    wait_for(lambda: (redis_client.get(f"{prefix}:mgr:{manager_id}:lease") or b"").startswith(a.replica_id.encode()),
             timeout=30, what="A to hold the checker lease")
    b = start_manager("b", cluster=cluster, builtin_monitor=False)
    creation = Creation(redis_client, prefix, manager_id, b, timeout=120)
    b.signal(signal.SIGSTOP)
    try:
        # B's entry expires (TTL after its last beat) and stays expired for a second or more, while
        # A's checker passes every 0.3 s: before the grace, the first of them removed the creation
        wait_for(lambda: not redis_client.exists(f"{prefix}:replica:{b.replica_id}"), timeout=2 * TTL,
                 interval=0.05, what="B's registry entry to expire")
        time.sleep(1.0)
        assert creation.status() is not None, "the checker removed a live replica's creation"
    finally:
        b.signal(signal.SIGCONT)
    creation.check_served()


def test_a_new_lease_holder_keeps_an_unregistered_replicas_creation(start_manager, redis_client: redis.Redis,
                                                                    prefix: str, manager_id: str) -> None:
    """A replica creating a node but absent from the registry (its first heartbeats failed: the
    chart's bundled Redis still starting) keeps the node when another replica takes the checker
    lease meanwhile: a new holder calls no replica dead for its first replica TTL (test_kubernetes'
    two-pod install got 502 "container is marked for removal" from the holder's first pass)."""
    ttl = 10.0  # B's grace: A is registered again well within it, B's passes without A come first
    cluster = {"heartbeat_seconds": 0.5, "replica_ttl_seconds": ttl}
    # A's creation waits out its stop: its probe's deadline must not pass while it is stopped
    node = {"creation_wait_seconds": 120}
    lease_key = f"{prefix}:mgr:{manager_id}:lease"
    # the holder before B, gone: its lease keeps B waiting until it lapses (deleted below)
    redis_client.set(lease_key, "gone-replica:0", px=600_000)
    b = start_manager("b", cluster=cluster, node=node, checker={"interval_seconds": 0.3, "lease_ttl_seconds": 3})
    a = start_manager("a", cluster=cluster, node=node, builtin_monitor=False)  # A never holds the lease
    creation = Creation(redis_client, prefix, manager_id, a, timeout=180)
    a.signal(signal.SIGSTOP)
    try:
        # A is out of the registry: deleted, and it cannot beat again while stopped (a beat already
        # on its way could land after the first delete)
        entry = f"{prefix}:replica:{a.replica_id}"
        wait_for(lambda: redis_client.delete(entry) == 0 and not redis_client.exists(entry), timeout=10,
                 interval=0.2, what="A's registry entry to stay deleted")
        redis_client.delete(lease_key)  # the old holder's lease lapses: B takes it
        holder = wait_for(lambda: (redis_client.get(lease_key) or b"").decode(), timeout=30, interval=0.02,
                          what="B to take the checker lease")
        assert holder.startswith(b.replica_id + ":"), holder
        token = holder.rsplit(":", 1)[1]
        # two passes of B's: the first judged A's creation (removed it, before the grace), the
        # second began after all the first did
        stats = f"{prefix}:mgr:{manager_id}:checker_stats"
        wait_for(lambda: int(redis_client.hget(stats, f"cycles:{token}") or 0) >= 2, timeout=60, interval=0.02,
                 what="two checker passes of B")
        assert not redis_client.exists(entry), "A registered while stopped: the passes did not judge it unregistered"
        assert creation.status() == b"creating", \
            "B's first passes as lease holder removed an unregistered replica's creation"
    finally:
        a.signal(signal.SIGCONT)
    creation.check_served()
