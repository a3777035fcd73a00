"""A node is as hostile as a client: whatever one sends, it costs only its own session. Each test
is an attack of issue 22 from a node (testing/hostile_node.py) or a client, while another session
on the same replica keeps answering within a bound and the replica's memory stays bounded."""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

import httpx

from testing.hostile_node import hostile_config, set_rules, spec_header, stats
from tests.edge_tools import rss_bytes


def session(url: str) -> httpx.Client:
    c = httpx.Client(base_url=url, timeout=120)
    r = c.post("/get_cookie")
    assert r.status_code == 200, r.text
    return c


class Bystander:
    """Another session on the replica, calling its node in a loop while an attack runs; the slowest
    answer and the replica's peak RSS are kept. The bound is BOUND_S, at least 10x its normal time."""

    BOUND_S = 2.0

    def __init__(self, m: Any) -> None:
        self.m = m
        self.c = session(m.url)
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            assert self.c.get("/").status_code == 200
            times.append(time.perf_counter() - t0)
        self.normal = statistics.median(times)
        assert self.BOUND_S >= 10 * self.normal, f"normal time {self.normal:.3f}s leaves no 10x margin"
        self.rss_before = rss_bytes(m.pid)
        self.rss_peak = self.rss_before
        self.slowest = 0.0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        c = httpx.Client(base_url=self.m.url, cookies=self.c.cookies, timeout=60)
        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                r = c.get("/")
                if r.status_code != 200:
                    self.failures.append(f"{r.status_code} {r.text[:200]}")
            except httpx.HTTPError as exc:
                self.failures.append(repr(exc))
            self.slowest = max(self.slowest, time.perf_counter() - t0)
            self.rss_peak = max(self.rss_peak, rss_bytes(self.m.pid))
            self._stop.wait(0.05)

    def __enter__(self) -> "Bystander":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(120)

    def check(self, rss_growth: int) -> None:
        """The other session answered every time within the bound; RSS grew by less than rss_growth."""
        assert not self.failures, self.failures[:5]
        assert self.slowest < self.BOUND_S, f"another session took {self.slowest:.2f}s (normal {self.normal:.4f}s)"
        grew = self.rss_peak - self.rss_before
        assert grew < rss_growth, f"replica RSS grew by {grew >> 20} MiB (bound {rss_growth >> 20} MiB)"


def attack(c: httpx.Client, **spec: Any) -> httpx.Response | str:
    """A request asking the node for this answer; what the client got, or what went wrong."""
    try:
        return c.get("/", headers=spec_header(**spec))
    except httpx.HTTPError as exc:
        return repr(exc)


def test_the_hostile_node_fixture_answers_as_asked(start_manager) -> None:
    m = start_manager(**hostile_config())
    c = session(m.url)
    assert c.get("/").json() == {"ok": True}
    r = c.get("/", headers=spec_header(status=201, headers=[["x-a", "1"]], body="hi", content_type="text/plain"))
    assert (r.status_code, r.headers["x-a"], r.text) == (201, "1", "hi")
    r = c.get("/", headers=spec_header(body_bytes=300_000, split=50_000, delay=0.01))
    assert r.content == b"d" * 300_000
    set_rules(c, {"/": {"status": 202}})
    assert c.get("/").status_code == 202
    set_rules(c, {})
    assert stats(c)["requests"] >= 5


HEAD_LIMIT_HIT = "proxy.max_response_head_bytes"
RSS_BOUND = 64 << 20


def test_a_1gb_response_header_is_cut_off_at_the_head_limit(start_manager) -> None:
    m = start_manager(**hostile_config())
    h = session(m.url)
    with Bystander(m) as other:
        r = attack(h, head_bytes=1 << 30)
    other.check(RSS_BOUND)
    assert isinstance(r, httpx.Response) and r.status_code == 502 and HEAD_LIMIT_HIT in r.json()["detail"], getattr(r, "text", r)
    seen = stats(h)
    # the node's connection was dropped early: it could write only what the socket buffers hold
    assert seen["aborted"] >= 1 and seen["written"] < 64 << 20, seen
    assert h.get("/").status_code == 200  # the session itself goes on


def test_12800_headers_of_800mb_are_cut_off_at_the_head_limit(start_manager) -> None:
    m = start_manager(**hostile_config())
    h = session(m.url)
    with Bystander(m) as other:
        r = attack(h, header_count=12800, header_size=65536)
    other.check(RSS_BOUND)
    assert isinstance(r, httpx.Response) and r.status_code == 502 and HEAD_LIMIT_HIT in r.json()["detail"], getattr(r, "text", r)
    assert stats(h)["written"] < 64 << 20


def test_too_many_response_headers_are_a_502_naming_the_limit(start_manager) -> None:
    m = start_manager(**hostile_config(proxy={"max_response_headers": 50}))
    h = session(m.url)
    assert h.get("/", headers=spec_header(header_count=40)).status_code == 200
    with Bystander(m) as other:
        r = attack(h, header_count=4000)  # 47 KB: under the head limit, over the count
    other.check(RSS_BOUND)
    assert isinstance(r, httpx.Response) and r.status_code == 502 and "proxy.max_response_headers" in r.json()["detail"], getattr(r, "text", r)
