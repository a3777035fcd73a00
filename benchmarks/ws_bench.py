"""WebSocket: latency a manager adds to a message, against the node directly.

One session (``POST /get_cookie`` on one replica); two connections to the node's ``/ws/echo``:

    direct    ``ws://<node address>:31942/ws/echo`` with the node's secret (as the manager reaches it)
    manager   ``ws://127.0.0.1:<manager port>/ws/echo`` with the ``node_id`` cookie

N small text messages (default 2000, 32 bytes) are sent one at a time on each connection, each
timed from send to its echo (websockets' asyncio client, no compression). The two connections
alternate in blocks of 100 messages so drift of a shared 2-CPU machine hits both alike; 100
untimed messages on each go first. Reported: p50/p90/p99 per path and the differences.

    .venv/bin/python -m benchmarks.ws_bench [--n 2000] [--size 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect

from benchmarks._support import node_direct, one_manager
from benchmarks.common import (
    command_line,
    docker_client,
    fmt,
    load_line,
    markdown_table,
    percentile,
    summarize,
    write_json,
)

BLOCK = 100


async def roundtrips(ws: ClientConnection, n: int, payload: str, out: list[float] | None) -> None:
    for _ in range(n):
        t0 = time.perf_counter()
        await ws.send(payload)
        got = await ws.recv()
        el = time.perf_counter() - t0
        if got != payload:
            raise RuntimeError(f"echo mismatch: {got!r}")
        if out is not None:
            out.append(el)


async def measure(direct_url: str, secret: str, manager_url: str, node_id: str, n: int,
                  size: int) -> dict[str, list[float]]:
    payload = ("x" * size)[:size]
    opts: dict[str, Any] = {"open_timeout": 10, "compression": None, "ping_interval": None, "max_queue": 4}
    samples: dict[str, list[float]] = {"direct": [], "manager": []}
    async with connect(direct_url, additional_headers={"X-Node-Secret": secret}, **opts) as d, \
            connect(manager_url, additional_headers={"Cookie": f"node_id={node_id}"}, **opts) as m:
        conns = {"direct": d, "manager": m}
        for ws in conns.values():
            await roundtrips(ws, BLOCK, payload, None)
        done = 0
        while done < n:
            k = min(BLOCK, n - done)
            for name, ws in conns.items():
                await roundtrips(ws, k, payload, samples[name])
            done += k
    return samples


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ws_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="timed messages per path (default 2000)")
    p.add_argument("--size", type=int, default=32, help="message size in bytes (default 32)")
    args = p.parse_args(argv)
    print(f"$ {command_line()}", flush=True)
    load0 = os.getloadavg()

    client = docker_client()
    with one_manager("ws") as run:
        m = run.m
        resp = httpx.post(m.url + "/get_cookie", timeout=60)
        if resp.status_code != 200:
            raise RuntimeError(f"/get_cookie answered {resp.status_code}: {resp.text[:300]}")
        node_id = resp.cookies["node_id"]
        host, port, secret = node_direct(client, node_id)
        direct = f"ws://{host}:{port}/ws/echo"
        via = f"ws://127.0.0.1:{m.port}/ws/echo"
        print(f"  node {node_id[:12]} on {host}:{port}, manager on 127.0.0.1:{m.port}", file=sys.stderr, flush=True)
        samples = asyncio.run(measure(direct, secret, via, node_id, args.n, args.size))
        httpx.post(m.url + "/release_session", headers={"Cookie": f"node_id={node_id}"}, timeout=30)
    client.close()
    removed, deleted = run.removed, run.deleted

    d, v = summarize(samples["direct"]), summarize(samples["manager"])
    rows: list[list[object]] = [["direct to the node", d["n"], fmt(d["p50_ms"], 3), fmt(d["p90_ms"], 3), fmt(d["p99_ms"], 3), "-"],
            ["through the manager", v["n"], fmt(v["p50_ms"], 3), fmt(v["p90_ms"], 3), fmt(v["p99_ms"], 3),
             f"{v['p50_ms'] / d['p50_ms']:.2f}×"],
            ["added by the manager", "", f"{v['p50_ms'] - d['p50_ms']:+.3f}", f"{v['p90_ms'] - d['p90_ms']:+.3f}",
             f"{v['p99_ms'] - d['p99_ms']:+.3f}", ""]]
    print(f"\nWebSocket /ws/echo round trip, {args.size}-byte text messages, one at a time\n")
    print(markdown_table(["path", "messages", "p50 ms", "p90 ms", "p99 ms", "p50 ratio"], rows))
    diffs = [b - a for a, b in zip(samples["direct"], samples["manager"])]
    print(f"\nper-message difference (manager − direct, paired by index): median "
          f"{percentile(diffs, 50) * 1000:+.3f} ms")
    print(f"cleanup: {removed} container(s) removed, {deleted} key(s) deleted")
    path = write_json("ws_bench", {"loadavg_at_start": load0,
        "params": {**vars(args), "manager_id": run.mid, "key_prefix": run.prefix, "block": BLOCK},
        "direct": {**d, "samples_ms": [x * 1000 for x in samples["direct"]]},
        "manager": {**v, "samples_ms": [x * 1000 for x in samples["manager"]]},
        "added_p50_ms": v["p50_ms"] - d["p50_ms"], "added_p99_ms": v["p99_ms"] - d["p99_ms"],
        "cleanup": {"containers_removed": removed, "keys_deleted": deleted},
    })
    print(load_line(load0))
    print(f"results: {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
