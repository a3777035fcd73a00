"""Metrics scraped by a real Prometheus (Debian's package) from two replicas; promtool
checks the exposition; several uvicorn workers aggregate through multiprocess mode."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from testing.harness import ManagerProc, free_port
from tests.conftest import wait_for


class Prometheus:
    def __init__(self, targets: list[str], tmp: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = tmp / "prometheus.yml"
        cfg.write_text("global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
                       "scrape_configs:\n  - job_name: toolserver-manager\n"
                       f"    static_configs: [{{targets: [{', '.join(repr(t) for t in targets)}]}}]\n")
        subprocess.run(["promtool", "check", "config", str(cfg)], check=True, capture_output=True)
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={tmp / 'prom-data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def query(self, expr: str) -> list[dict]:  # type: ignore[type-arg]
        r = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=5)
        r.raise_for_status()
        return r.json()["data"]["result"]  # type: ignore[no-any-return]

    def value(self, expr: str) -> float | None:
        try:
            res = self.query(expr)
        except httpx.HTTPError:
            return None
        return float(res[0]["value"][1]) if res else None

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    started: list[Prometheus] = []

    def start(managers: list[ManagerProc]) -> Prometheus:
        p = Prometheus([f"127.0.0.1:{m.port}" for m in managers], tmp_path)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


def test_prometheus_scrapes_two_replicas(start_manager, prometheus_for) -> None:  # type: ignore[no-untyped-def]
    a = start_manager(name="a")
    b = start_manager(name="b")
    prom = prometheus_for([a, b])
    c = httpx.Client(base_url=a.url, timeout=60)
    assert c.post("/get_cookie").status_code == 200
    node_id = c.cookies["node_id"]
    for url in (a.url, b.url):
        r = httpx.post(url + "/get_available_tools", cookies={"node_id": node_id}, timeout=30)
        assert r.status_code == 200
    wait_for(lambda: prom.value('count(up{job="toolserver-manager"} == 1)') == 2, timeout=30, interval=0.5,
             what="both replicas scraped")
    wait_for(lambda: prom.value('sum(toolserver_node_create_duration_seconds_count{outcome="ready"})') == 1,
             timeout=30, interval=0.5, what="one creation")
    wait_for(lambda: prom.value('count(toolserver_proxy_requests_total{route="/get_available_tools",code="2xx"} > 0)')
             == 2, timeout=30, interval=0.5, what="a proxied request counted on each replica")
    wait_for(lambda: prom.value("sum(toolserver_checker_leader)") == 1, timeout=30, interval=0.5,
             what="exactly one leader")
    wait_for(lambda: prom.value('sum(toolserver_nodes{status="running"})') == 1, timeout=30, interval=0.5,
             what="node gauges from the lease holder only")
    text = httpx.get(a.url + "/metrics").text
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "node_id" not in text.replace("node_create", "")  # never a node id as a label
    c.post("/release_session")


def test_multiprocess_workers_aggregate(start_manager) -> None:  # type: ignore[no-untyped-def]
    m = start_manager(workers=2)
    c = httpx.Client(base_url=m.url, timeout=60)
    assert c.post("/get_cookie").status_code == 200
    cookies = {"node_id": c.cookies["node_id"]}
    # one connection per request (no keep-alive), so the kernel hands requests to both workers;
    # each worker is a replica of its own and says so in x-tsm-replica
    served: dict[str, int] = {}
    while len(served) < 2 or min(served.values()) < 5:
        r = httpx.post(m.url + "/", cookies=cookies, timeout=30)
        assert r.status_code == 200
        served[r.headers["x-tsm-replica"]] = served.get(r.headers["x-tsm-replica"], 0) + 1
        assert sum(served.values()) < 400, f"one worker took every request: {served}"
    n = sum(served.values())
    # each worker answers /metrics with the sum over both processes
    answered: set[str] = set()
    for _ in range(400):
        if answered == set(served):
            break
        r = httpx.get(m.url + "/metrics", timeout=30)
        line = next(x for x in r.text.splitlines()
                    if x.startswith('toolserver_proxy_requests_total{code="2xx",route="/"}'))
        assert float(line.split()[-1]) == n, (r.headers["x-tsm-replica"], line, served)
        answered.add(r.headers["x-tsm-replica"])
    assert answered == set(served), f"/metrics answered only by {answered}"
    wait_for(lambda: any(x == "toolserver_checker_leader{{manager_id=\"{}\"}} 1.0".format(m.cfg["manager_id"])
                         for x in httpx.get(m.url + "/metrics").text.splitlines()), timeout=15,
             what="one leader over two workers")
    c.post("/release_session")
