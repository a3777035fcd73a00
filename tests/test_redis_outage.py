"""A Redis outage, for real: a private redis-server for the test, killed mid-run.

Every Redis call goes through the store's error mapping, so an admin call answers 503
with JSON naming Redis and /ws/events closes cleanly; the process keeps running.
"""

from __future__ import annotations

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from testing.harness import PrivateRedis
from tests.conftest import ADMIN_TOKEN, wait_for

ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}


def _down(m, r: PrivateRedis) -> None:  # type: ignore[no-untyped-def]
    r.kill()
    wait_for(lambda: httpx.get(m.url + "/ready").status_code == 503, what="/ready to see Redis gone")


@pytest.mark.parametrize("method,path", [("GET", "/admin/leases"), ("GET", "/admin/nodes"),
                                         ("GET", "/admin/replicas"), ("POST", "/admin/managers/{manager_id}/drain")])
def test_admin_call_during_outage_is_503_naming_redis(start_manager, private_redis: PrivateRedis,  # type: ignore[no-untyped-def]
                                                      manager_id: str, method: str, path: str) -> None:
    m = start_manager(redis={"url": private_redis.url, "socket_timeout_seconds": 0.5}, builtin_monitor=False)
    path = path.format(manager_id=manager_id)  # drain takes only a manager_id it knows
    assert httpx.request(method, m.url + path, headers=ADMIN, timeout=10).status_code == 200
    _down(m, private_redis)
    r = httpx.request(method, m.url + path, headers=ADMIN, timeout=10)
    assert r.status_code == 503, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.json()["detail"].startswith("redis is unavailable")
    assert m.proc is not None and m.proc.poll() is None
    assert "Traceback" not in m.logs()


def test_events_socket_during_outage_closes_cleanly(start_manager, private_redis: PrivateRedis) -> None:
    m = start_manager(redis={"url": private_redis.url, "socket_timeout_seconds": 0.5}, builtin_monitor=False)
    url = "ws" + m.url[4:] + "/ws/events?last_event_id=0-0"
    with connect(url, additional_headers=ADMIN, open_timeout=10) as ws:  # Redis up: a normal session
        assert '"success":true' in ws.recv(timeout=10)
    _down(m, private_redis)
    # resuming needs the stream: with Redis gone the socket says so and closes, "try again later"
    with connect(url, additional_headers=ADMIN, open_timeout=10) as ws:
        assert '"success":true' in ws.recv(timeout=10)
        with pytest.raises(ConnectionClosed):
            while True:
                ws.recv(timeout=10)
    assert ws.close_code == 1013, (ws.close_code, ws.close_reason)
    assert ws.close_reason.startswith("redis is unavailable")
    # the handler has ended (its socket no longer counted): its own log line, had it failed, is written
    wait_for(lambda: 'toolserver_websocket_connections{kind="events"} 0.0' in httpx.get(m.url + "/metrics").text,
             interval=0.05, what="the events handler finished")
    assert m.proc is not None and m.proc.poll() is None
    assert "Traceback" not in m.logs() and "Exception in ASGI application" not in m.logs()


def test_a_session_goes_on_through_an_outage_once_its_cached_record_is_dropped(  # type: ignore[no-untyped-def]
        start_manager, private_redis: PrivateRedis) -> None:
    # entries gone at once, as an event (a health change, a checker update) drops them just before
    # a failover: the call after must not need Redis, as one on a cached entry does not
    m = start_manager(redis={"url": private_redis.url, "socket_timeout_seconds": 0.5}, builtin_monitor=False,
                      proxy={"address_cache_seconds": 0.01})
    c = httpx.Client(base_url=m.url, timeout=30)
    r = c.post("/get_cookie")
    assert r.status_code == 200, r.text
    assert c.post("/get_available_tools").status_code == 200
    _down(m, private_redis)
    for _ in range(3):
        r = c.post("/get_available_tools")
        assert r.status_code == 200, r.text
    # a session this replica never served has no record to go on: Redis is named, nothing is guessed
    r = httpx.post(m.url + "/get_available_tools", cookies={"node_id": "ab" * 32}, timeout=10)
    assert r.status_code == 503 and r.json()["detail"].startswith("redis is unavailable"), r.text
