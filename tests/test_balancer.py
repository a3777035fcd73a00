"""The load balancer of the README (testing.harness.HAProxy) in front of two replicas: a replica
stopped (SIGTERM) or killed (SIGKILL) under a steady stream of idempotent requests loses none of
them; each is retried on the other replica."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from testing.harness import HAProxy, ManagerProc
from testing.hostile_node import hostile_config, spec_header, stats
from tests.conftest import until, wait_for

STREAMS = 8  # concurrent clients: some request is always in flight on each replica
EACH = 5  # requests each client completes before the stop, and again once it is all over
DELAY = 2.0  # s between the pieces of a slow answer


async def _stream(url: str, cookie: str, stop: asyncio.Event, done: list[int], out: Counter[str]) -> None:
    async with httpx.AsyncClient(base_url=url, cookies={"node_id": cookie}, timeout=10) as c:
        while not stop.is_set():
            try:
                r = await c.get("/")
                out[str(r.status_code) if r.status_code != 200 or r.json() == {"message": "Hello World"}
                    else "200 but wrong body"] += 1
            except httpx.HTTPError as exc:
                out[type(exc).__name__] += 1
            done[0] += 1


async def _traffic_while(url: str, cookie: str, act, over) -> Counter[str]:  # type: ignore[no-untyped-def]
    """STREAMS clients sending GETs: act() once each has done EACH, then on until over() says the
    fault is behind us (the replica gone and out of the balancer) and each has done EACH more."""
    out: Counter[str] = Counter()
    stop = asyncio.Event()
    done = [[0] for _ in range(STREAMS)]
    tasks = [asyncio.create_task(_stream(url, cookie, stop, d, out)) for d in done]
    try:
        await until(lambda: all(d[0] >= EACH for d in done), timeout=30, interval=0.02, what="traffic on every client")
        act()
        await until(over, timeout=30, interval=0.02, what="the stopped replica gone and out of the balancer")
        after = [d[0] for d in done]
        await until(lambda: all(d[0] >= a + EACH for d, a in zip(done, after)), timeout=30, interval=0.02,
                    what="traffic after the fault")
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    return out


def _live_in_balancer(lb: HAProxy, cookie: str, m: ManagerProc) -> bool:
    """The balancer sends requests to m again (its health check passed)."""
    seen = {httpx.get(lb.url + "/", cookies={"node_id": cookie}, timeout=5).headers.get("x-tsm-replica")
            for _ in range(6)}
    return m.replica_id in seen


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_replica_stopping_loses_no_idempotent_request(sig: signal.Signals, start_manager,
                                                        tmp_path: Path) -> None:
    a = start_manager(name="a")
    b = start_manager(name="b")
    lb = HAProxy([(m.replica_id, m.port) for m in (a, b)], tmp_path)
    try:
        r = httpx.post(lb.url + "/get_cookie", timeout=60)
        assert r.status_code == 200, r.text
        cookie = r.cookies["node_id"]
        wait_for(lambda: _live_in_balancer(lb, cookie, a) and _live_in_balancer(lb, cookie, b),
                 what="both replicas serving through the balancer")
        log = tmp_path / "haproxy.log"

        def over() -> bool:  # the process has exited and the balancer's health check marked it down
            return a.proc is not None and a.proc.poll() is not None and \
                f"Server managers/{a.replica_id} is DOWN" in log.read_text(errors="replace")

        out = asyncio.run(_traffic_while(lb.url, cookie, lambda: a.signal(sig), over))
        total = sum(out.values())
        assert out == Counter({"200": total}), f"requests lost when a replica got {sig.name}: {dict(out)}"
        # the survivor serves on, through the balancer, alone
        assert httpx.get(lb.url + "/", cookies={"node_id": cookie}, timeout=10).headers["x-tsm-replica"] == \
            b.replica_id
        httpx.post(lb.url + "/release_session", cookies={"node_id": cookie}, timeout=30)
    finally:
        lb.stop()


def test_a_replica_killed_while_an_answer_comes_in_sends_none_of_it(start_manager, tmp_path: Path) -> None:
    """A GET's small answer is on its way from the node (its head and part of its body in, the rest
    DELAY s later) when the replica is killed: the replica had sent none of it, so the balancer saw
    no answer and retried the GET on the other replica. (A replica that passed the head on at once
    left the balancer a begun answer, which it cannot retry: the client got a broken response.)"""
    a = start_manager(name="a", **hostile_config())
    b = start_manager(name="b", **hostile_config())
    lb = HAProxy([(m.replica_id, m.port) for m in (a, b)], tmp_path, balance="first")  # every request to a
    try:
        r = httpx.post(lb.url + "/get_cookie", timeout=60)
        assert r.status_code == 200, r.text
        cookie = r.cookies["node_id"]
        direct_b = httpx.Client(base_url=b.url, cookies={"node_id": cookie}, timeout=30)
        body = "x" * 2000
        # the node writes "HTTP/1.1 200 OK" and content-type, then the end of the head with the
        # first 976 body bytes, then the rest, SPLIT bytes at a time, DELAY s apart
        spec = spec_header(body=body, split=1000, delay=DELAY, tag="slow")
        got: dict[str, Any] = {}

        def get() -> None:
            try:
                got["r"] = httpx.get(lb.url + "/", cookies={"node_id": cookie}, headers=spec, timeout=60)
            except httpx.HTTPError as exc:
                got["error"] = exc

        t = threading.Thread(target=get)
        t.start()
        # the head is in and the body is not (a has what it needs to begin the answer)
        wait_for(lambda: stats(direct_b)["tagged"].get("slow", 0) >= 1049, timeout=30, interval=0.05,
                 what="the node's head and first body bytes written")
        assert stats(direct_b)["tagged"]["slow"] < 1049 + 1024, "the answer ended before the kill: no test"
        a.signal(signal.SIGKILL)
        t.join(60)
        assert "error" not in got, f"the client got a broken answer: {got['error']!r}"
        r = got["r"]
        assert r.status_code == 200 and r.text == body, (r.status_code, r.text[:200])
        assert r.headers["x-tsm-replica"] == b.replica_id  # retried on b
        httpx.post(lb.url + "/release_session", cookies={"node_id": cookie}, timeout=30)
    finally:
        lb.stop()
