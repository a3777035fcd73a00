"""The HTTP edge under attack, on a real manager and real nodes: each case of issue 14 turned into
what must not happen (a response reaching another request, a client stalling the manager, a
passing fault ending a session, a secret in a URL)."""

from __future__ import annotations

import collections
import json
import secrets
import select
import socket
import threading
import uuid

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from shared.config import XAGENT_POST_PATHS
from testing import redis_env
from tests.conftest import ADMIN_TOKEN, project_containers, wait_for
from tests.edge_tools import Forwarder, exchange, rss_bytes

DIAG = {"redirect_to_node_path": {"post": [*XAGENT_POST_PATHS, "/diag"], "get": ["/", "/diag"]}}


def session(url: str) -> httpx.Client:
    c = httpx.Client(base_url=url, timeout=60)
    assert c.post("/get_cookie").status_code == 200
    return c


def _expect_round(port: int, cookies: list[str], rounds: int) -> None:
    """Requests with Expect: 100-continue and 1.2 MB bodies (curl adds Expect by itself past 1 MB),
    alternating sessions, each on its own client connection: each answer must name its request."""
    for i in range(rounds):
        ident = f"req-{i}-{uuid.uuid4().hex[:6]}"
        body = json.dumps({"tool_names": [ident], "pad": "x" * 1_200_000}).encode()
        r = exchange(port, "POST", "/get_json_schema_for_tools",
                     [("cookie", f"node_id={cookies[i % len(cookies)]}"), ("content-type", "application/json")],
                     body, expect=True)
        assert r.status == 200 and json.loads(r.body)["missing_tools"] == [ident], r
        assert r.interim == [100]  # the manager's own server answered the Expect
        # the node's own interim answers (100, 103) are absorbed, never taken for the response
        r = exchange(port, "POST", f"/diag?id={ident}&interim=100,103", [("cookie", f"node_id={cookies[0]}")],
                     b"z" * 1000, expect=True)
        assert (r.status, r.body, r.headers["x-diag-body-len"]) == (200, ident.encode(), "1000"), r


def test_expect_100_continue_never_shifts_responses(start_manager) -> None:
    m = start_manager(**DIAG)
    cookies = [session(m.url).cookies["node_id"] for _ in range(2)]
    _expect_round(m.port, cookies, 6)


def test_expect_100_continue_through_the_owner_replica(manager_id_b: str, start_manager, manager_id: str) -> None:
    mid_b = manager_id_b
    # both sessions on a's engine (spread placement would put the second on b's)
    a = start_manager(name="a", cluster={"placement": "local"}, **DIAG)
    b = start_manager(name="b", mid=mid_b, cluster={"proxy_through_owner": {manager_id: True}}, **DIAG)
    cookies = [session(a.url).cookies["node_id"] for _ in range(2)]
    # sessions A and B share B's pooled connections to the owner replica
    _expect_round(b.port, cookies, 6)
    assert 'toolserver_forwarded_requests_total{kind="proxy"} 12.0' in httpx.get(b.url + "/metrics").text


@pytest.mark.parametrize("workers", [1, 2])
def test_a_huge_request_head_is_refused_while_it_arrives(start_manager, workers: int) -> None:
    m = start_manager(workers=workers)
    assert m.proc is not None
    rss_before = rss_bytes(m.proc.pid)
    sent: list[int] = []
    replies: list[bytes] = []

    def flood() -> None:
        total = 0
        with socket.create_connection(("127.0.0.1", m.port), timeout=60) as s:
            try:
                s.sendall(b"GET /alive HTTP/1.1\r\nhost: x\r\nx-big: ")
                chunk = b"a" * 65536
                while total < 100 << 20:
                    s.sendall(chunk)
                    total += len(chunk)
                replies.append(s.recv(4096))
            except OSError:
                replies.append(b"")  # reset by the server: it stopped reading
        sent.append(total)

    threads = [threading.Thread(target=flood) for _ in range(4)]
    for t in threads:
        t.start()
    while True:  # /alive answers during the flood (and at least once)
        assert httpx.get(m.url + "/alive", timeout=30).status_code == 200
        if not any(t.is_alive() for t in threads):
            break
    for t in threads:
        t.join()
    assert len(sent) == 4 and all(n < 8 << 20 for n in sent), sent  # cut off early, not read whole
    assert all(r == b"" or r.startswith(b"HTTP/1.1 431") for r in replies), replies
    assert rss_bytes(m.proc.pid) - rss_before < 64 << 20
    # a head over the limit that then pauses gets the JSON 431 and a closed connection
    with socket.create_connection(("127.0.0.1", m.port), timeout=30) as s:
        s.sendall(b"GET /alive HTTP/1.1\r\nhost: x\r\nx-big: " + b"b" * 100_000)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 431") and b"request head too large" in data
    # the edge's own answer names its replica like every other (each worker is a replica of its own)
    assert (b"\r\nx-tsm-replica: " + m.replica_id.encode()) in data


def test_trickled_request_heads_are_timed_out(start_manager) -> None:
    m = start_manager(proxy={"header_timeout_seconds": 2})
    socks = [socket.create_connection(("127.0.0.1", m.port), timeout=30) for _ in range(300)]
    answers: dict[socket.socket, bytes] = {}
    try:
        for s in socks:
            s.sendall(b"GET /alive HTTP/1.1\r\n")
        rounds = 0
        while len(answers) < len(socks) and rounds < 120:  # a bound, not a measurement
            rounds += 1
            for s in socks:
                if s not in answers:
                    try:
                        s.sendall(b"x-a: b\r\n")
                    except OSError:
                        answers[s] = b""
            readable, _, _ = select.select([s for s in socks if s not in answers], [], [], 0.5)
            for s in readable:
                try:
                    answers[s] = s.recv(4096)
                except OSError:
                    answers[s] = b""
            assert httpx.get(m.url + "/alive", timeout=30).status_code == 200
        assert len(answers) == len(socks), "some trickling connections were never closed"
        assert all(a == b"" or a.startswith(b"HTTP/1.1 408") for a in answers.values())
        assert any(a.startswith(b"HTTP/1.1 408") for a in answers.values())
        assert all(b"\r\nx-tsm-replica: " + m.replica_id.encode() + b"\r\n" in a
                   for a in answers.values() if a.startswith(b"HTTP/1.1 408"))
    finally:
        for s in socks:
            s.close()


def test_bodies_on_bodyless_routes_are_refused_however_framed(start_manager, docker_client,
                                                              manager_id: str) -> None:
    m = start_manager()
    big = b"x" * 2_000_000

    def chunked(data: bytes):  # type: ignore[no-untyped-def]
        for i in range(0, len(data), 500_000):
            yield data[i:i + 500_000]

    for path in ("/get_cookie", "/reconnect_session", "/close_session", "/release_session"):
        with_length = httpx.post(m.url + path, content=big, timeout=60)
        with_chunks = httpx.post(m.url + path, content=chunked(big), timeout=60)
        assert with_length.status_code == with_chunks.status_code == 400, (path, with_chunks.text)
        assert "takes no request body" in with_chunks.json()["detail"]
    assert project_containers(docker_client, manager_id) == []
    # a small body is ignored either way (XAgent's clients send `{}`)
    assert httpx.post(m.url + "/get_cookie", content=chunked(b"{}"), timeout=60).status_code == 200


def test_reconnect_racing_proxied_calls_gives_no_500(start_manager) -> None:
    m = start_manager(**DIAG)
    c = session(m.url)
    stop = threading.Event()
    statuses: collections.Counter[int] = collections.Counter()
    bad: list[str] = []

    def caller(i: int) -> None:
        with httpx.Client(base_url=m.url, cookies=c.cookies, timeout=120) as cl:
            n = 0
            while not stop.is_set():
                n += 1
                ident = f"c{i}-{n}"
                r = cl.post(f"/diag?id={ident}&size=20000", content=b"y" * 200_000)
                statuses[r.status_code] += 1
                if r.status_code == 200:
                    if r.content[:len(ident)] != ident.encode():
                        bad.append(f"mismatch {ident}: {r.content[:40]!r}")
                elif r.status_code != 503:
                    bad.append(f"{r.status_code}: {r.text[:300]}")

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    try:
        for _ in range(3):
            wait_for(lambda: statuses[200] > 0, what="calls getting through")
            assert c.post("/reconnect_session").status_code == 200
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert bad == [] and statuses[200] > 0, (bad[:5], statuses)


def test_engine_unreachable_is_a_503_naming_the_engine(start_manager, tmp_path, docker_client) -> None:
    sock = str(tmp_path / "docker.sock")
    engine = Forwarder("/var/run/docker.sock", listen=sock)
    try:
        m = start_manager(docker_host=f"unix://{sock}")
        c = session(m.url)
        node_id = c.cookies["node_id"]
        assert c.post("/").status_code == 200
        engine.stop()  # the engine is gone; then so is the node (found stopped by the next request)
        docker_client.containers.get(node_id).stop(timeout=1)
        for path in ("/", "/reconnect_session"):
            r = c.post(path)
            assert r.status_code == 503 and "docker engine is unavailable" in r.json()["detail"], (path, r.text)
        engine = Forwarder("/var/run/docker.sock", listen=sock)  # back: the session goes on
        assert wait_for(lambda: c.post("/").status_code == 200, what="the session served again")
    finally:
        engine.stop()


def test_redis_unreachable_is_a_503_naming_redis(start_manager) -> None:
    redis_fwd = Forwarder(("127.0.0.1", redis_env.PORT))
    port = redis_fwd.address[1]  # type: ignore[index]
    try:
        m = start_manager(redis={"url": redis_env.private_url("127.0.0.1", port)}, proxy={"address_cache_seconds": 0})
        c = session(m.url)
        assert c.post("/").status_code == 200
        redis_fwd.stop()
        # what needs Redis fails naming it: a new session, and a session this replica never served
        # (a session it served goes on from its last record: test_redis_outage)
        stranger = httpx.Client(base_url=m.url, timeout=10, cookies={"node_id": secrets.token_hex(32)})
        for client, path in ((c, "/get_cookie"), (stranger, "/")):
            r = client.post(path)
            assert r.status_code == 503 and "redis is unavailable" in r.json()["detail"], (path, r.text)
        stranger.close()
        redis_fwd = Forwarder(("127.0.0.1", redis_env.PORT), listen=port)
        assert wait_for(lambda: c.post("/").status_code == 200, what="the session served again")
    finally:
        redis_fwd.stop()


def test_a_proxy_read_timeout_is_a_504_with_a_json_detail(start_manager) -> None:
    m = start_manager(proxy={"path_timeouts": {"/diag": 1.0}}, **DIAG)
    c = session(m.url)
    r = c.post("/diag?id=slow&delay=5")
    assert r.status_code == 504 and r.json() == {"detail": "the node did not answer within 1.0 s"}
    assert c.post("/diag?id=after").content == b"after"  # the late answer reached nobody


def test_a_running_node_whose_server_is_gone_is_a_503_not_responding(start_manager, docker_client,
                                                                      redis_client, prefix: str) -> None:
    # the node's server runs under a shell that outlives it: the container keeps running without it
    # (a call finding the node silent waits up to creation_wait_seconds for it to answer again)
    silent_server = {"creation_kwargs": {"command": ["sh", "-c", "python3 -m app & exec sleep infinity"]}}
    m = start_manager(node=silent_server)
    c = session(m.url)
    node_id = c.cookies["node_id"]
    assert c.post("/get_available_tools").status_code == 200
    files = f"{m.url}/admin/nodes/{node_id}/files"
    admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    write = {"tool_name": "FileSystemEnv_write_to_file", "arguments": {"filepath": "seen.txt", "content": "x"}}
    assert c.post("/execute_tool", json=write).status_code == 200
    r = httpx.get(files, headers=admin, timeout=30)
    assert r.status_code == 200 and "seen.txt" in r.json()["tree"], r.text
    node = docker_client.containers.get(node_id)
    kill = ("for p in /proc/[0-9]*; do [ \"$(tr '\\0' ' ' < $p/cmdline)\" = 'python3 -m app ' ] && "
            "kill -9 ${p#/proc/} && echo killed; done; true")
    assert b"killed" in node.exec_run(["sh", "-c", kill]).output
    # asked through a replica that waits 2 s for a silent node (the same answer as after 20 s)
    quick = start_manager(name="quick", node={**silent_server, "creation_wait_seconds": 2})
    qc = httpx.Client(base_url=quick.url, cookies=c.cookies, timeout=60)
    for _ in range(2):  # a new connection, then a pooled one or a new one: either way the node does not answer
        r = qc.post("/get_available_tools")
        assert r.status_code == 503 and r.json() == {"detail": "node is not responding"}, r.text
    # the admin's workspace listing goes the proxy's way to the node and is answered alike
    r = httpx.get(f"{quick.url}/admin/nodes/{node_id}/files", headers=admin, timeout=30)
    assert r.status_code == 503 and r.json() == {"detail": "node is not responding"}, r.text
    # a passing fault: the session is kept (running, same container) and a restart brings it back
    node.reload()
    assert node.status == "running"
    assert redis_client.hget(f"{prefix}:node:{node_id}", "status") == b"running"
    assert c.post("/reconnect_session").status_code == 200
    assert c.post("/get_available_tools").status_code == 200
    c.post("/release_session")


def test_an_admin_token_in_a_url_is_refused_and_never_logged(start_manager) -> None:
    m = start_manager()
    r = httpx.get(m.url + f"/admin/replicas?token={ADMIN_TOKEN}")
    assert r.status_code == 400 and "not accepted in the URL" in r.json()["detail"]
    ws = "ws" + m.url[4:] + "/ws/events"
    with pytest.raises(InvalidStatus) as refused:
        connect(ws + f"?token={ADMIN_TOKEN}", open_timeout=10)
    assert refused.value.response.status_code == 403
    with connect(ws, additional_headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, open_timeout=10) as conn:
        assert json.loads(conn.recv(timeout=10))["success"] is True
    with connect(ws, subprotocols=[f"bearer.{ADMIN_TOKEN}"], open_timeout=10) as conn:  # type: ignore[list-item]
        assert json.loads(conn.recv(timeout=10))["success"] is True
    m.stop()
    assert ADMIN_TOKEN not in m.logs()


AMBIGUOUS = {  # request framings a proxy and a server may read differently (HTTP Garden's favourites)
    "length and chunked": b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
    "unknown coding": b"Content-Length: 5\r\nTransfer-Encoding: xchunked\r\n",
    "space before colon": b"Content-Length: 5\r\nTransfer-Encoding : chunked\r\n",
    "two lengths": b"Content-Length: 5\r\nContent-Length: 0\r\n",
    "chunked not last": b"Transfer-Encoding: chunked, identity\r\n",
    "obs-fold": b"Transfer-Encoding: identity\r\n chunked\r\nContent-Length: 5\r\n",
}


@pytest.mark.parametrize("case", list(AMBIGUOUS))
def test_an_ambiguous_body_framing_is_refused_never_smuggled(start_manager, case: str) -> None:
    m = start_manager(**DIAG)
    cookie = session(m.url).cookies["node_id"]
    smuggled = f"GET /diag?id=smuggled HTTP/1.1\r\nHost: x\r\nCookie: node_id={cookie}\r\n\r\n".encode()
    head = f"POST /diag?id=first HTTP/1.1\r\nHost: x\r\nCookie: node_id={cookie}\r\n".encode()
    with socket.create_connection(("127.0.0.1", m.port), timeout=30) as s:
        s.sendall(head + AMBIGUOUS[case] + b"\r\n0\r\n\r\n" + smuggled)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 400"), data[:200]
    assert b"x-diag-id" not in data  # neither request reached the node
