"""``toolserver-admin``: the admin API from a shell (nodes, replicas, leases, drain, engines, events).

Exit codes: 0 ok, 1 API error (the server's detail on stderr), 2 usage, 3 cannot connect.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import msgspec

from toolserver_manager.client import (
    AsyncAdmin,
    ConnectionFailed,
    RequestTimeout,
    ToolServerError,
)
from toolserver_manager.models import Event, NodeDetail, NodeList

PROG = "toolserver-admin"
EXIT_OK, EXIT_API, EXIT_USAGE, EXIT_CONNECT = 0, 1, 2, 3


# --- formatting ---------------------------------------------------------------------------------
def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns separated by two spaces."""
    cells = [[str(h) for h in headers]] + [["" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def ago(ts: float | None, now: float | None = None) -> str:
    """A duration as 5s, 3m12s, 2h04m, 3d05h; '-' for an unset time."""
    if not ts:
        return "-"
    return duration((now or time.time()) - ts)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(max(0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def size(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def stamp(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def emit_json(data: Any) -> None:
    print(json.dumps(msgspec.to_builtins(data), indent=2, sort_keys=False))


# --- commands -----------------------------------------------------------------------------------
async def cmd_nodes(a: AsyncAdmin, ns: argparse.Namespace) -> int:
    res: NodeList = await a.list_nodes(manager_id=ns.manager_id, status=ns.status,
                                       min_idle_seconds=ns.min_idle_seconds, limit=ns.limit, offset=ns.offset)
    if ns.json:
        emit_json(res)
        return EXIT_OK
    now = time.time()
    rows = [(n.id[:12], n.manager_id, n.tier or "-", n.status, n.health, f"{n.host}:{n.port}" if n.port else "-",
             ago(n.created_at, now), duration(n.idle_seconds), n.replica_id or "-", n.client or "-")
            for n in res.nodes]
    print(table(("NODE", "MANAGER", "TIER", "STATUS", "HEALTH", "ADDRESS", "AGE", "IDLE", "REPLICA", "CLIENT"),
                rows))
    shown = len(res.nodes)
    if res.total != shown:
        print(f"({shown} of {res.total} shown; offset {res.offset})")
    return EXIT_OK


async def cmd_inspect(a: AsyncAdmin, ns: argparse.Namespace) -> int:
    d: NodeDetail = await a.inspect_node(ns.node_id)
    if ns.json:
        emit_json(d)
        return EXIT_OK
    r = d.record
    now = time.time()
    pairs: list[tuple[str, Any]] = [
        ("id", r.id), ("manager_id", r.manager_id), ("tier", r.tier or "-"), ("status", r.status),
        ("container", r.container_id[:12] or "-"), ("workspace", r.workspace or "-"), ("health", r.health),
        ("address", f"{r.host}:{r.port}" if r.port else "-"), ("image", r.image or "-"), ("role", r.role),
        ("replica", r.replica_id or "-"), ("client", r.client or "-"),
        ("created", f"{stamp(r.created_at)} ({ago(r.created_at, now)} ago)"),
        ("ready", stamp(r.ready_at)),
        ("last request", f"{stamp(r.last_request_at)} ({ago(r.last_request_at, now)} ago)"),
    ]
    c = d.container
    if c is None:
        pairs.append(("container state", "gone" if not d.error else "-"))
    else:
        pairs += [("container state", c.get("status")), ("docker health", c.get("health"))]
    if d.stats:
        s = d.stats
        for key in sorted(s):
            v = s[key]
            pairs.append((f"stats.{key}", size(v) if "mem" in key.lower() and isinstance(v, (int, float)) else v))
    if d.error:
        pairs.append(("error", d.error))
    print(table(("FIELD", "VALUE"), pairs))
    return EXIT_OK


async def cmd_release(a: AsyncAdmin, ns: argparse.Namespace) -> int:
    results = await a.release_nodes(*ns.node_ids)
    failed = {k: v for k, v in results.items() if v != "released"}
    if ns.json:
        emit_json({"results": results})
    else:
        for node_id, outcome in results.items():
            print(f"{node_id}  {outcome}")
    for node_id, why in failed.items():
        print(f"{PROG}: error: {node_id}: {why}", file=sys.stderr)
    return EXIT_API if failed else EXIT_OK


async def cmd_replicas(a: AsyncAdmin, ns: argparse.Namespace) -> int:
    reps = await a.replicas()
    if ns.json:
        emit_json({"replicas": reps})
        return EXIT_OK
    now = time.time()
    rows = [(r.replica_id, r.manager_id, r.url, r.version, duration(r.age_seconds),
             f"{ago(r.heartbeat_at, now)} ago", "yes" if r.draining else "no") for r in reps]
    print(table(("REPLICA", "MANAGER", "URL", "VERSION", "UP", "HEARTBEAT", "DRAINING"), rows))
    return EXIT_OK


async def cmd_leases(a: AsyncAdmin, ns: argparse.Namespace) -> int:
    leases = await a.leases()
    if ns.json:
        emit_json({"leases": leases})
        return EXIT_OK
    now = time.time()
    rows = [(le.manager_id, le.holder or "(none)", le.token if le.token is not None else "-",
             ago(le.since, now) if le.since else "-",
             f"{le.expires_in_ms / 1000:.1f}s" if le.expires_in_ms is not None and le.expires_in_ms >= 0 else "-",
             le.cycles_by_token.get(str(le.token), 0) if le.token is not None else "-") for le in leases]
    print(table(("MANAGER", "HOLDER", "TOKEN", "HELD FOR", "EXPIRES IN", "CYCLES"), rows))
    return EXIT_OK


async def cmd_drain(a: AsyncAdmin, ns: argparse.Namespace) -> int:
    st = await a.drain(ns.manager_id, on=not ns.off)
    if ns.json:
        emit_json(st)
    else:
        print(f"{st.manager_id}: {'draining (no new nodes placed here)' if st.draining else 'accepting new nodes'}")
    return EXIT_OK


async def cmd_engines(a: AsyncAdmin, ns: argparse.Namespace) -> int:
    res = await a.engines()
    if ns.json:
        emit_json(res)
    else:
        rows = []
        for mid, row in sorted(res.results.items()):
            e = (row or {}).get("engine") or {}
            rows.append((mid, (row or {}).get("replica_id", "-"), e.get("name", "-"), e.get("version", "-"),
                         e.get("nodes", "-"), e.get("running", "-"), e.get("cpus", "-"), size(e.get("memory_bytes"))))
        print(table(("MANAGER", "REPLICA", "ENGINE", "VERSION", "CONTAINERS", "RUNNING", "CPUS", "MEMORY"), rows))
    for mid, why in sorted(res.failures.items()):
        print(f"{PROG}: warning: {mid}: {why}", file=sys.stderr)
    return EXIT_OK


async def cmd_config(a: AsyncAdmin, ns: argparse.Namespace) -> int:
    cfg = await a.config()
    if ns.json:
        emit_json(cfg)
    else:
        import yaml

        sys.stdout.write(yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False))
    return EXIT_OK


def format_event(ev: Event) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(ev.at)) + f".{int(ev.at % 1 * 1000):03d}" if ev.at else "-"
    if ev.event == "gap":
        return f"{when:<12}  gap  {ev.detail}"
    detail = f"  {ev.detail}" if ev.detail else ""
    return f"{when:<12}  {ev.event:<12}  {ev.node_id[:12]:<12}  {ev.manager_id}  {ev.replica_id or '-'}  {ev.id}{detail}"


async def cmd_events(a: AsyncAdmin, ns: argparse.Namespace) -> int:
    seen = 0
    async with a.watch_events(ns.manager_id, ns.last_event_id) as stream:
        if not ns.json:
            scope = f"manager {ns.manager_id}" if ns.manager_id else "all managers"
            print(f"# watching events of {scope} (Ctrl-C to stop)", file=sys.stderr)
        async for ev in stream:
            if ns.json:
                print(json.dumps(msgspec.to_builtins(ev)), flush=True)
            else:
                print(format_event(ev), flush=True)
            if ev.event != "gap":
                seen += 1
                if ns.count and seen >= ns.count:
                    break
    return EXIT_OK


async def cmd_fork(a: AsyncAdmin, ns: argparse.Namespace) -> int:
    ids = await a.fork_node(ns.node_id, ns.count)
    if ns.json:
        emit_json({"source": ns.node_id, "sessions": ids})
    else:
        print("\n".join(ids))
    return EXIT_OK


async def cmd_snapshot(a: AsyncAdmin, ns: argparse.Namespace) -> int:
    snap = await a.snapshot_node(ns.node_id, ns.name)
    if ns.json:
        emit_json(snap)
    else:
        print(f"{snap.name}  {snap.bytes} bytes on {snap.manager_id}")
    return EXIT_OK


async def cmd_snapshots(a: AsyncAdmin, ns: argparse.Namespace) -> int:
    snaps = await a.snapshots()
    if ns.json:
        emit_json({"snapshots": snaps})
        return EXIT_OK
    now = time.time()
    rows = [(s.name, s.manager_id, str(s.bytes), s.source[:12], s.client, f"{ago(s.created_at, now)} ago")
            for s in snaps]
    print(table(("NAME", "MANAGER", "BYTES", "SOURCE", "CLIENT", "CREATED"), rows))
    return EXIT_OK


async def cmd_delete_snapshot(a: AsyncAdmin, ns: argparse.Namespace) -> int:
    await a.delete_snapshot(ns.name, ns.client)
    if ns.json:
        emit_json({"deleted": ns.name})
    else:
        print(f"{ns.name}  deleted")
    return EXIT_OK


COMMANDS = {
    "nodes": cmd_nodes, "inspect": cmd_inspect, "release": cmd_release, "replicas": cmd_replicas,
    "leases": cmd_leases, "drain": cmd_drain, "engines": cmd_engines, "config": cmd_config, "events": cmd_events,
    "fork": cmd_fork, "snapshot": cmd_snapshot, "snapshots": cmd_snapshots, "delete-snapshot": cmd_delete_snapshot,
}


# --- arguments ----------------------------------------------------------------------------------
def non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive(text: str) -> int:
    value = non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=argparse.SUPPRESS,
                        help="a manager replica's base URL (default: $TSM_URL or http://127.0.0.1:8080)")
    common.add_argument("--token", default=argparse.SUPPRESS, help="admin token (default: $TSM_ADMIN_TOKEN)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable JSON output")
    common.add_argument("--timeout", type=float, default=argparse.SUPPRESS,
                        help="seconds to wait for an answer (default 30)")

    p = argparse.ArgumentParser(prog=PROG, parents=[common],
                                description="Administer a toolserver-manager cluster through its admin API.",
                                epilog="exit codes: 0 ok, 1 API error, 2 usage, 3 cannot connect")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=help_, description=help_)

    n = add("nodes", "list nodes")
    n.add_argument("--manager-id", help="only this manager_id's nodes")
    n.add_argument("--status", help="only nodes in this status (running, paused, exited, archived, creating, ...)")
    n.add_argument("--min-idle-seconds", type=non_negative, help="only nodes idle at least this long")
    n.add_argument("--limit", type=positive, help="at most this many (server default 100, max 1000)")
    n.add_argument("--offset", type=non_negative, help="skip this many")
    i = add("inspect", "show one node: record, container state, stats")
    i.add_argument("node_id")
    r = add("release", "kill and remove nodes")
    r.add_argument("node_ids", nargs="+", metavar="NODE_ID")
    add("replicas", "list live manager replicas")
    add("leases", "show who holds each manager_id's checker lease")
    d = add("drain", "stop (or with --off, resume) placing new nodes on a manager_id")
    d.add_argument("manager_id")
    d.add_argument("--off", action="store_true", help="stop draining")
    add("engines", "show each manager_id's Docker engine")
    add("config", "show the answering replica's configuration (secrets redacted)")
    f = add("fork", "copy a session into new sessions of its client (its workspace at one instant)")
    f.add_argument("node_id")
    f.add_argument("--count", type=positive, default=1, help="how many copies (default 1)")
    s = add("snapshot", "save a session's workspace as a named, immutable snapshot")
    s.add_argument("node_id")
    s.add_argument("name")
    add("snapshots", "list every snapshot")
    ds = add("delete-snapshot", "delete a snapshot (sessions made from it keep their files)")
    ds.add_argument("name")
    ds.add_argument("--client", help="whose (names are per client; needed when several keep this name)")
    e = add("events", "stream node lifecycle events until Ctrl-C")
    e.add_argument("--manager-id", help="only this manager_id's events")
    e.add_argument("--last-event-id", help="first replay the events after this id ('0' for all stored)")
    e.add_argument("--count", type=positive, help="stop after this many events")
    return p


async def run(ns: argparse.Namespace) -> int:
    async with AsyncAdmin(ns.url, ns.token, timeout=ns.timeout) as admin:
        return await COMMANDS[ns.command](admin, ns)


def main(argv: Sequence[str] | None = None) -> int:
    ns = parser().parse_args(argv)
    ns.url = getattr(ns, "url", None) or os.environ.get("TSM_URL") or "http://127.0.0.1:8080"
    ns.token = getattr(ns, "token", None) or os.environ.get("TSM_ADMIN_TOKEN") or None
    ns.json = getattr(ns, "json", False)
    ns.timeout = getattr(ns, "timeout", None) or 30.0
    try:
        code = asyncio.run(run(ns))
    except KeyboardInterrupt:
        return EXIT_OK
    except (ConnectionFailed, RequestTimeout) as exc:
        print(f"{PROG}: error: {exc.detail}", file=sys.stderr)
        return EXIT_CONNECT
    except ToolServerError as exc:
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        status = f"{exc.status_code} " if exc.status_code is not None else ""
        hint = " (pass --token or set TSM_ADMIN_TOKEN)" if exc.status_code == 401 else ""
        print(f"{PROG}: error: {status}{detail}{hint}", file=sys.stderr)
        return EXIT_API
    except BrokenPipeError:
        return EXIT_OK
    return code


if __name__ == "__main__":
    sys.exit(main())
