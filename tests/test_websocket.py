"""WebSocket proxy and the events stream on real parts, across replicas and through HAProxy."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import pytest
import redis
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from testing.harness import HAProxy
from tests.conftest import ADMIN_TOKEN, wait_for

FAST_EVENTS = {"events": {"keepalive_seconds": 0.5, "client_timeout_seconds": 3}}
# the same keepalive, for tests whose clients listen without sending: a silent client is closed after
# client_timeout_seconds, which a busy machine's slow get_cookie between two events once reached
QUIET_CLIENTS = {"events": {"keepalive_seconds": 0.5, "client_timeout_seconds": 120}}


def ws_url(http_url: str, path: str) -> str:
    return "ws" + http_url[4:] + path


def open_ws(url: str, node_id: str | None = None, **kw) -> ClientConnection:  # type: ignore[no-untyped-def]
    headers = {"Cookie": f"node_id={node_id}"} if node_id else {}
    headers.update(kw.pop("additional_headers", {}))
    return connect(url, additional_headers=headers, open_timeout=10, **kw)


def recv_json(ws: ClientConnection, timeout: float = 10) -> dict:  # type: ignore[type-arg]
    return json.loads(ws.recv(timeout=timeout))


def recv_event(ws: ClientConnection, timeout: float = 15) -> dict:  # type: ignore[type-arg]
    """The next lifecycle event (health changes from the checker are skipped)."""
    while True:
        msg = recv_json(ws, timeout)
        if msg.get("type") == "event" and msg["event"] != "health":
            return msg


def test_shell_output_streams_line_by_line_through_another_replica(start_manager, tmp_path: Path) -> None:
    a1 = start_manager(name="a1")
    a2 = start_manager(name="a2")
    lb = HAProxy([(m.replica_id, m.port) for m in (a1, a2)], tmp_path)
    try:
        c = httpx.Client(base_url=a1.url, timeout=60)
        assert c.post("/get_cookie").status_code == 200
        node_id = c.cookies["node_id"]
        for base in (a2.url, lb.url):
            r = c.post("/execute_tool", json={"tool_name": "shell_command_executor",
                                              "arguments": {"command": "rm -f go"}})
            assert r.status_code == 200, r.text
            with open_ws(ws_url(base, "/ws/shell"), node_id) as ws:
                # the second line is only printed after we react to the first: proof of streaming
                ws.send(json.dumps({"command": "echo first; while [ ! -f go ]; do sleep 0.05; done; echo second",
                                    "timeout": 30}))
                msg = recv_json(ws)
                assert msg == {"type": "stdout", "line": "first"}
                r = c.post("/upload_file", files={"file": ("go", b"1")})
                assert r.status_code == 200
                assert recv_json(ws) == {"type": "stdout", "line": "second"}
                assert recv_json(ws)["type"] == "exit"
                with pytest.raises(ConnectionClosed) as closed:
                    ws.recv(timeout=5)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
        c.post("/release_session")
    finally:
        lb.stop()


def test_echo_frames_close_codes_and_limits(start_manager) -> None:
    m = start_manager(proxy={"websocket_max_message_bytes": 65536})
    c = httpx.Client(base_url=m.url, timeout=60)
    c.post("/get_cookie")
    node_id = c.cookies["node_id"]
    with open_ws(ws_url(m.url, "/ws/echo"), node_id) as ws:
        ws.send("hello")
        assert ws.recv(timeout=5) == "hello"
        blob = bytes(range(256)) * 100
        ws.send(blob)
        assert ws.recv(timeout=5) == blob
        ws.send("close:4001")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001
    with open_ws(ws_url(m.url, "/ws/echo"), node_id, max_size=None) as ws:
        ws.send(b"x" * 200_000)
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    # no or bad cookie: refused before the upgrade
    with pytest.raises(InvalidStatus) as refused:
        open_ws(ws_url(m.url, "/ws/echo"), "0" * 64)
    assert refused.value.response.status_code == 403
    c.post("/release_session")


def test_events_across_replicas_with_resume(start_manager, redis_client: redis.Redis, prefix: str,
                                            manager_id: str) -> None:
    a1 = start_manager(name="a1", **QUIET_CLIENTS)
    a2 = start_manager(name="a2", **QUIET_CLIENTS)
    admin_url = ws_url(a2.url, f"/ws/events?manager_id={manager_id}")
    bearer = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with open_ws(admin_url, additional_headers=bearer) as ws:
        hello = recv_json(ws)
        assert hello["status"] == "connect" and hello["success"] is True and hello["message"] == "connect success"
        c = httpx.Client(base_url=a1.url, timeout=60)
        c.post("/get_cookie")
        node_id = c.cookies["node_id"]
        got = [recv_event(ws), recv_event(ws)]
        assert [(e["event"], e["node_id"]) for e in got] == [("created", node_id), ("ready", node_id)]
        last_id = got[-1]["id"]
        # a session watcher (by cookie) on the other replica; its liveness is marked in Redis
        with open_ws(ws_url(a2.url, "/ws/events"), node_id) as sw:
            hello = recv_json(sw)
            assert hello["success"] is True and hello["data"]["id"] == node_id
            assert redis_client.hget(f"{prefix}:watch:{node_id}", "status") == b"alive"
            sw.send(json.dumps({"type": "ping"}))
            assert recv_json(sw) == {"type": "pong"}
            c.post("/close_session")
            ev = recv_event(sw)
            assert ev["event"] == "stopped" and ev["node_id"] == node_id
        wait_for(lambda: redis_client.hget(f"{prefix}:watch:{node_id}", "status") == b"close", timeout=5,
                 what="watch marked closed")
        assert recv_event(ws)["event"] == "stopped"
    # events happen while nobody watches; a resume with the last id gets them
    c.post("/reconnect_session")
    c.post("/release_session")
    with open_ws(admin_url + f"&last_event_id={last_id}", additional_headers=bearer) as ws:
        assert recv_json(ws)["success"] is True
        seen = []
        while not seen or seen[-1] != "released":
            seen.append(recv_event(ws)["event"])
        assert seen[0] == "stopped" and "restarted" in seen and seen[-1] == "released"


def test_a_resume_into_the_removed_stream_of_a_manager_id_gone_is_told(start_manager, redis_client: redis.Redis,
                                                                     prefix: str) -> None:
    """A manager_id with no replica, session or event for events.gone_stream_grace_seconds has its
    stream removed by a live replica's upkeep; a socket resuming into it by an id from before is
    told its events are gone (a gap naming the removal), not left waiting for them."""
    gone = f"gone-{uuid.uuid4().hex[:8]}"
    stream = f"{prefix}:mgr:{gone}:events"
    ids = [redis_client.xadd(stream, {"e": json.dumps({"type": "ready", "node_id": f"n{i}", "manager_id": gone,
                                                        "at": 1.0})}).decode() for i in range(3)]
    redis_client.sadd(f"{prefix}:managers", gone)  # seen once, never heartbeating since
    m = start_manager(name="up", checker={"upkeep_seconds": 0.5}, events={"gone_stream_grace_seconds": 1.0,
                                                                         **QUIET_CLIENTS["events"]})
    wait_for(lambda: not redis_client.exists(stream), timeout=60, what="the gone manager_id's stream removed")
    assert redis_client.get(f"{prefix}:mgr:{gone}:events_removed") == ids[-1].encode()
    bearer = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with open_ws(ws_url(m.url, f"/ws/events?manager_id={gone}&last_event_id={ids[0]}"), additional_headers=bearer) as ws:
        assert recv_json(ws)["success"] is True
        gap = recv_json(ws)
        assert gap["type"] == "gap" and gap["reason"] == "stream_removed" and gap["removed_to"] == ids[-1], gap
        assert gone in gap["message"]
    with open_ws(ws_url(m.url, f"/ws/events?manager_id={gone}&last_event_id={ids[-1]}"), additional_headers=bearer) as ws:
        assert recv_json(ws)["success"] is True  # nothing missed since: no gap
        ws.send(json.dumps({"type": "ping"}))
        assert recv_json(ws) == {"type": "pong"}


def test_events_keepalive_silence_and_bad_input(start_manager) -> None:
    m = start_manager(**FAST_EVENTS)
    # no cookie, no token: the handshake says why, then closes normally
    with open_ws(ws_url(m.url, "/ws/events")) as ws:
        hello = recv_json(ws)
        assert hello["status"] == "connect" and hello["success"] is False and "invalid node_id" in hello["message"]
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
    with open_ws(ws_url(m.url, "/ws/events"), additional_headers={"Authorization": "Bearer wrong"}) as ws:
        assert recv_json(ws)["success"] is False
    with open_ws(ws_url(m.url, "/ws/events"), subprotocols=[f"bearer.{ADMIN_TOKEN}"]) as ws:
        assert recv_json(ws)["success"] is True
        assert recv_json(ws) == {"type": "pong"}  # the server's own keep-alive
        ws.send("{not json")
        assert recv_json(ws)["type"] == "error"
        ws.send(json.dumps({"type": "launch_missiles"}))
        err = recv_json(ws)
        while err == {"type": "pong"}:
            err = recv_json(ws)
        assert err["type"] == "error" and "unknown message type" in err["message"]
        # silent past client_timeout_seconds: closed with a meaningful code
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                ws.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4408


def test_node_stops_after_its_last_watcher_left(start_manager, redis_client: redis.Redis, prefix: str) -> None:
    m = start_manager(events={"stop_after_unwatched_seconds": 1}, node={"idle_grace_seconds": 0},
                      checker={"interval_seconds": 0.3})
    c = httpx.Client(base_url=m.url, timeout=60)
    c.post("/get_cookie")
    node_id = c.cookies["node_id"]
    with open_ws(ws_url(m.url, "/ws/events"), node_id) as ws:
        assert recv_json(ws)["success"] is True
        ws.send(json.dumps({"type": "ping"}))
        assert recv_json(ws) == {"type": "pong"}
    wait_for(lambda: redis_client.hget(f"{prefix}:node:{node_id}", "status") == b"exited", timeout=15,
             what="node stopped after its watcher left")
    c.post("/release_session")
    assert not redis_client.exists(f"{prefix}:watch:{node_id}")
