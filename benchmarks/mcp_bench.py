"""MCP gateway: ``tools/call`` through ``/mcp`` next to the same tool through XAgent's ``/execute_tool``.

One manager replica, one node per client (all of the same image, made by the manager):

    execute_tool     ``POST /execute_tool`` with the ``node_id`` cookie (``/get_cookie``'s session)
    mcp 2025-11-25   ``POST /mcp`` tools/call with ``Mcp-Session-Id`` (a session from ``initialize``)
    mcp 2026-07-28   ``POST /mcp`` tools/call, stateless: routing headers, the ``session`` handle
                     argument mirrored in ``Mcp-Param-Session`` (a handle from ``create_session``)
    mcp SDK client   the official ``mcp`` client's ``call_tool`` (2025-11-25): the above plus the
                     client's own cost, as an agent would see it

The first three are sent by one httpx client (keep-alive, HTTP/1.1) with byte-identical tool
arguments. Latency: N calls one at a time per case, the cases alternating in blocks of 20 so
drift of a shared machine hits all alike. Rate: C concurrent callers for D seconds per case.
The manager's CPU time per call (user + system, /proc) and Redis commands per call (Redis's
``INFO commandstats``) are read around each rate run (Redis is shared: other clients' commands
are noise).

    .venv/bin/python -m benchmarks.mcp_bench [--n 300] [--concurrency 16] [--duration 4]
        [--tool FileSystemEnv_print_filesys_struture]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from benchmarks._support import one_manager
from benchmarks.common import (
    calls_between,
    command_line,
    cpu_seconds,
    docker_client,
    fmt,
    load_line,
    markdown_table,
    redis_calls,
    summarize,
    write_json,
)

BLOCK = 20
MODERN = "2026-07-28"
META = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {}}
MCP_HEADERS = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
Caller = Callable[[], Awaitable[None]]


async def open_cases(url: str, c: httpx.AsyncClient, tool: str, args: dict[str, Any]) -> dict[str, Caller]:
    """One session per case, and a coroutine that makes one call of the tool in it."""
    r = await c.post(url + "/get_cookie", timeout=60)
    r.raise_for_status()
    cookie = r.cookies["node_id"]
    xbody = json.dumps({"tool_name": tool, "arguments": args}).encode()

    r = await c.post(url + "/mcp", headers=MCP_HEADERS, timeout=60, json={
        "jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "bench", "version": "0"}}})
    r.raise_for_status()
    legacy_headers = {**MCP_HEADERS, "mcp-session-id": r.headers["mcp-session-id"],
                      "mcp-protocol-version": "2025-11-25"}
    legacy_body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                              "params": {"name": tool, "arguments": args}}).encode()

    modern_headers = {**MCP_HEADERS, "mcp-protocol-version": MODERN, "mcp-method": "tools/call"}
    r = await c.post(url + "/mcp", headers={**modern_headers, "mcp-name": "create_session"}, timeout=60, json={
        "jsonrpc": "2.0", "id": 0, "method": "tools/call",
        "params": {"name": "create_session", "arguments": {}, "_meta": META}})
    r.raise_for_status()
    handle = r.json()["result"]["structuredContent"]["session"]
    modern_headers.update({"mcp-name": tool, "mcp-param-session": handle})
    modern_body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
        "name": tool, "arguments": {"session": handle, **args}, "_meta": META}}).encode()

    async def xagent() -> None:
        r = await c.post(url + "/execute_tool", content=xbody, cookies={"node_id": cookie},
                         headers={"content-type": "application/json"})
        if r.status_code != 200:
            raise RuntimeError(f"/execute_tool: {r.status_code} {r.text[:200]}")

    def mcp(headers: dict[str, str], body: bytes) -> Caller:
        async def call() -> None:
            r = await c.post(url + "/mcp", content=body, headers=headers)
            if r.status_code != 200 or r.json()["result"].get("isError"):
                raise RuntimeError(f"/mcp: {r.status_code} {r.text[:200]}")
        return call

    return {"execute_tool": xagent, "mcp 2025-11-25": mcp(legacy_headers, legacy_body),
            "mcp 2026-07-28": mcp(modern_headers, modern_body)}


async def latency(cases: dict[str, Caller], n: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in cases}
    for call in cases.values():  # warm-up
        for _ in range(BLOCK):
            await call()
    done = 0
    while done < n:
        k = min(BLOCK, n - done)
        for name, call in cases.items():
            for _ in range(k):
                t0 = time.perf_counter()
                await call()
                out[name].append(time.perf_counter() - t0)
        done += k
    return out


async def rate(call: Caller, concurrency: int, duration: float) -> int:
    stop = time.monotonic() + duration
    count = 0

    async def worker() -> None:
        nonlocal count
        while time.monotonic() < stop:
            await call()
            count += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return count


async def measure(url: str, pid: int, args: argparse.Namespace, r: Any) -> dict[str, Any]:
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    tool_args: dict[str, Any] = json.loads(args.arguments)
    limits = httpx.Limits(max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4)
    async with httpx.AsyncClient(limits=limits, timeout=60) as c, \
            Client(streamable_http_client(url + "/mcp"), mode="legacy") as sdk:
        cases = await open_cases(url, c, args.tool, tool_args)

        async def sdk_call() -> None:
            res = await sdk.call_tool(args.tool, tool_args)
            if res.is_error:
                raise RuntimeError(f"SDK call_tool: {res.content}")

        cases["mcp SDK client"] = sdk_call
        samples = await latency(cases, args.n)
        rates: dict[str, dict[str, Any]] = {}
        for name, call in cases.items():
            before, cpu0 = redis_calls(r), cpu_seconds([pid])
            t0 = time.monotonic()
            count = await rate(call, args.concurrency, args.duration)
            elapsed = time.monotonic() - t0
            cmds = calls_between(before, redis_calls(r))
            rates[name] = {"calls": count, "seconds": elapsed, "per_s": count / elapsed,
                           "manager_cpu_ms_per_call": (cpu_seconds([pid]) - cpu0) * 1000 / max(count, 1),
                           "redis_per_call": (cmds / count) if cmds is not None and count else None}
        return {"samples": samples, "rates": rates}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mcp_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=300, help="timed sequential calls per case (default 300)")
    p.add_argument("--concurrency", type=int, default=16, help="concurrent callers in the rate run (default 16)")
    p.add_argument("--duration", type=float, default=4.0, help="seconds of the rate run per case (default 4)")
    p.add_argument("--tool", default="FileSystemEnv_print_filesys_struture", help="the node tool to call")
    p.add_argument("--arguments", default="{}", help="its arguments, JSON (default {})")
    args = p.parse_args(argv)
    print(f"$ {command_line()}", flush=True)
    load0 = os.getloadavg()

    client = docker_client()  # the engine answers before anything starts
    client.close()
    with one_manager("mcp") as run:
        result = asyncio.run(measure(run.m.url, run.m.pid, args, run.r))
    removed, deleted = run.removed, run.deleted

    base = summarize(result["samples"]["execute_tool"])
    rows = []
    for name, samples in result["samples"].items():
        s, rt = summarize(samples), result["rates"][name]
        rows.append([name, s["n"], fmt(s["p50_ms"], 2), fmt(s["p90_ms"], 2), fmt(s["p99_ms"], 2),
                     f"{s['p50_ms'] - base['p50_ms']:+.2f}", fmt(rt["per_s"], 0),
                     f"{rt['per_s'] / result['rates']['execute_tool']['per_s']:.2f}×",
                     fmt(rt["manager_cpu_ms_per_call"], 2),
                     fmt(rt["redis_per_call"], 2) if rt["redis_per_call"] is not None else "-"])
    print(f"\ntools/call of {args.tool} {args.arguments}: latency one call at a time, rate with "
          f"{args.concurrency} concurrent callers for {args.duration:g} s\n")
    print(markdown_table(["path", "calls", "p50 ms", "p90 ms", "p99 ms", "p50 vs execute_tool", "calls/s",
                          "rate vs execute_tool", "manager CPU ms/call", "Redis cmds/call"], rows))
    print(f"cleanup: {removed} container(s) removed, {deleted} key(s) deleted")
    path = write_json("mcp_bench", {"loadavg_at_start": load0,
        "params": {**vars(args), "manager_id": run.mid, "key_prefix": run.prefix, "block": BLOCK},
        "latency": {k: {**summarize(v), "samples_ms": [x * 1000 for x in v]} for k, v in result["samples"].items()},
        "rate": result["rates"], "cleanup": {"containers_removed": removed, "keys_deleted": deleted}})
    print(load_line(load0))
    print(f"results: {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
