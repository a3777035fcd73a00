"""A client's quota count stays right when the replica making its sessions is killed (issue 29):
a creation waiting in the replica's queue holds a reservation that names its client; the checker
of a live replica drops it once the killed one's heartbeat is gone, and gives the count back."""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import httpx
import redis

from tests.conftest import wait_for


def test_a_replica_killed_mid_creation_leaves_its_clients_count_right(start_manager: Any, redis_client: redis.Redis,
                                                                      prefix: str, manager_id: str) -> None:
    over: dict[str, Any] = {"quota": {"client_header": "X-Client", "per_client": 5},
                            "creation": {"concurrency": 1, "queue_size": 8}}
    a = start_manager(name="ka", builtin_monitor=False, **over)
    nodes = f"{prefix}:mgr:{manager_id}:nodes"

    def create() -> None:
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(a.url + "/get_cookie", headers={"X-Client": "k1"}, timeout=60)

    threads = [threading.Thread(target=create) for _ in range(3)]
    for t in threads:
        t.start()

    def pending() -> int:
        return sum(1 for m in redis_client.smembers(nodes) if m.startswith(b"pending:"))

    # one creation under way, the others queued behind it, each holding its reservation
    wait_for(lambda: pending() >= 2, timeout=60, interval=0.01, what="creations queued")
    a.kill()
    for t in threads:
        t.join(70)

    def counted() -> int:
        return sum(int(v) for v in redis_client.hgetall(f"{prefix}:client_count").values())

    assert counted() == 3
    start_manager(name="kb", **over)  # its checker finds what the killed replica left
    wait_for(lambda: counted() == 0 and not redis_client.smembers(nodes), timeout=90, interval=0.2,
             what="the killed replica's reservations and sessions gone, and the client's count with them")
