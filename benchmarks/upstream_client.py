"""The proxy's upstream HTTP client against a maintained one: manager/proxy/upstream.py (httptools)
and aiohttp's client (llhttp), same requests to the same node, CPU µs per request.

    .venv/bin/python -m benchmarks.upstream_client [--n 20000] [--concurrency 32]

aiohttp is not a dependency of the project: install it anywhere on the path for this run
(e.g. ``pip install --target /tmp/aiohttp aiohttp`` and ``PYTHONPATH=/tmp/aiohttp``). The node
runs as a local process (``python -m app`` from node/), so docker-proxy's share is out of the
figures; both clients run in this one process, in turns, after an untimed warm-up each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from manager.proxy.upstream import UpstreamPool
from testing.harness import free_port

ROOT = Path(__file__).resolve().parents[1]
CASES = [("GET 100 B", "GET", "size=100", 0), ("GET 64 KiB", "GET", "size=65536", 0),
         ("POST 64 KiB, 100 B back", "POST", "size=100", 65536)]


def start_node(port: int, secret: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, NODE_HOST="127.0.0.1", NODE_PORT=str(port), NODE_SECRET=secret,
               NODE_WORKSPACE=tempfile.mkdtemp(prefix="bench-node-"))
    proc = subprocess.Popen([sys.executable, "-m", "app"], cwd=ROOT / "node", env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            httpx.get(f"http://127.0.0.1:{port}/", headers={"x-node-secret": secret}, timeout=1)
            return proc
        except httpx.HTTPError:
            time.sleep(0.05)
    proc.kill()
    sys.exit("the node did not start")


async def timed(n: int, conc: int, one: Callable[[int], Awaitable[None]]) -> tuple[float, float]:
    """(requests per second, CPU µs per request of this process)."""
    todo = iter(range(n))

    async def worker() -> None:
        for i in todo:
            await one(i)

    c0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conc)))
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    return n / wall, cpu / n * 1e6


async def bench(port: int, secret: str, n: int, conc: int) -> list[dict[str, Any]]:
    import aiohttp

    rows = []
    pool = UpstreamPool(max_idle_per_host=conc)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc), auto_decompress=False)
    try:
        for name, method, query, body_len in CASES:
            body = b"x" * body_len
            want = int(query.split("=")[1])
            target = f"/diag?id=b&{query}"

            async def ours(i: int) -> None:
                async def gen() -> AsyncIterator[bytes]:
                    yield body

                headers = [(b"x-node-secret", secret.encode())]
                if body_len:
                    headers.append((b"content-length", str(body_len).encode()))
                r = await pool.request(method, "127.0.0.1", port, target.encode(), headers,
                                       gen() if body_len else None, 5.0, 30.0)
                data = await r.read()
                r.close()
                if r.status_code != 200 or len(data) != want:
                    raise RuntimeError(f"upstream.py: {r.status_code}, {len(data)} bytes")

            async def theirs(i: int) -> None:
                async with session.request(method, f"http://127.0.0.1:{port}{target}",
                                           headers={"x-node-secret": secret}, data=body or None) as r:
                    data = await r.read()
                    if r.status != 200 or len(data) != want:
                        raise RuntimeError(f"aiohttp: {r.status}, {len(data)} bytes")

            for _label, fn in (("manager/proxy/upstream.py", ours), ("aiohttp", theirs)):
                await timed(min(1000, n), conc, fn)  # warm-up
            results: dict[str, tuple[float, float]] = {}
            for _ in range(2):  # alternate, twice: drift hits both alike
                for label, fn in (("manager/proxy/upstream.py", ours), ("aiohttp", theirs)):
                    rps, cpu = await timed(n, conc, fn)
                    prev = results.get(label)
                    results[label] = (rps, cpu) if prev is None else ((prev[0] + rps) / 2, (prev[1] + cpu) / 2)
            for label, (rps, cpu) in results.items():
                rows.append({"case": name, "client": label, "req_s": round(rps), "cpu_us": round(cpu, 1)})
    finally:
        pool.close()
        await session.close()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--concurrency", type=int, default=32)
    ns = p.parse_args()
    port, secret = free_port(), secrets.token_hex(16)
    node = start_node(port, secret)
    try:
        rows = asyncio.run(bench(port, secret, ns.n, ns.concurrency))
    finally:
        node.terminate()
        node.wait()
    print(f"$ python -m benchmarks.upstream_client --n {ns.n} --concurrency {ns.concurrency}\n")
    print("| case | client | req/s | client CPU µs/req |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['case']} | {r['client']} | {r['req_s']} | {r['cpu_us']} |")
    out = ROOT / "benchmarks" / "results" / "upstream_client.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
