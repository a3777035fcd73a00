"""The store at 10, 100 and 1,000 manager_ids (issue 29): the manager's own store code driving a
private redis-server and a real six-node Redis Cluster (testing.redis_cluster).

    .venv/bin/python -m benchmarks.store_scale [--managers 10,100,1000] [--churn 0.1] [--seconds 20]
        [--sessions 10] [--readers 10] [--target both|redis|cluster]

Per manager_id: ``--sessions`` live records, a checker lease, and sessions churned at ``--churn``
lifecycles a second (reserve, record, created, ready, activity, a fenced stop, a fenced release:
the store calls a replica and its checker make, 4 events each; commands counted include those a
script runs). Replicas are light tasks: one per
manager_id would be 1,000 readers decoding every event in this one process, so ``--readers``
replicas (of the first manager_ids) run the replica's own event hub (manager/events/hub.py), and
what one of them is handed a second is the per-replica figure (every replica of a manager_id reads
its manager_id's stream and the broadcast one, so the figure holds for each of them). Reported per run: per-replica event
deliveries/s (and that times the replicas: one per manager_id), Redis CPU (INFO cpu, all nodes of
a cluster) and memory per live session, commands per session lifecycle (INFO commandstats, less the
readers' XREADs and this script's INFO), the checker's store pass (its reads of one manager_id and a
fenced write) per manager_id, and one pass of the cluster-wide upkeep over them all (checker/upkeep.py:
the client counts' recount and the scan for streams of manager_ids gone; nothing is off or gone). JSON to benchmarks/results/store_scale.json.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import redis

from benchmarks.common import command_line, markdown_table, start_private_redis, write_json
from checker.upkeep import Upkeep
from manager.events.hub import EventHub
from manager.replica.activity import AddressCache
from shared.config import Config
from shared.models import Event, NodeRecord, NodeStatus, ReplicaInfo
from shared.store import Store
from testing import redis_env
from testing.redis_cluster import RedisCluster

NOT_LIFECYCLE = {"xread", "xrevrange", "zcount", "info", "ping", "hello", "client", "cluster", "command", "script", "evalsha_ro"}


class Target:
    """Where the store runs: the config it opens with, and sync clients of every node for INFO."""

    def __init__(self, name: str, redis_cfg: dict[str, Any], ports: list[int]) -> None:
        self.name = name
        self.redis_cfg = redis_cfg
        self.ports = ports

    def open(self, prefix: str) -> Store:
        cfg = msgspec.convert({"redis": {**self.redis_cfg, "key_prefix": prefix, "max_connections": 200}}, Config)
        return Store.open(cfg)

    def info(self) -> list[dict[str, Any]]:
        out = []
        for p in self.ports:
            with redis.Redis(host="127.0.0.1", port=p, password=redis_env.password()) as c:
                out.append({**c.info("cpu"), **c.info("memory"), "commandstats": c.info("commandstats")})
        return out


def _cpu(infos: list[dict[str, Any]]) -> float:
    return sum(float(i["used_cpu_user"]) + float(i["used_cpu_sys"]) for i in infos)


def _mem(infos: list[dict[str, Any]], ports: list[int], primaries: set[int]) -> int:
    return sum(int(i["used_memory_dataset"]) for i, p in zip(infos, ports) if p in primaries)


def _calls(infos: list[dict[str, Any]], ports: list[int], primaries: set[int]) -> int:
    n = 0
    for i, p in zip(infos, ports):
        if p not in primaries:
            continue
        for name, stats in i["commandstats"].items():
            if name.removeprefix("cmdstat_").split("|")[0] not in NOT_LIFECYCLE:
                n += int(stats["calls"])
    return n


def _rec(store: Store, mgr: str, client: str) -> NodeRecord:
    nid = store.keys.new_session_id(mgr)
    now = time.time()
    return NodeRecord(id=nid, short_id=nid[:12], manager_id=mgr, status=NodeStatus.CREATING, created_at=now,
                      updated_at=now, last_request_at=now, client=client)


async def lifecycle(store: Store, mgr: str, token: int, n: int) -> None:
    """One session's life in the store, as a replica and its checker call it."""
    client = f"client-{n % 50}"
    member = await store.reserve(mgr, per_manager=0, total=0, client=client, per_client=100000)
    rec = _rec(store, mgr, client)
    await store.put_node(rec, replace_member=member)
    await store.publish(Event(type="created", node_id=rec.id, manager_id=mgr))
    await store.update_node(rec.id, status=NodeStatus.RUNNING, ready_at=time.time())
    await store.publish(Event(type="ready", node_id=rec.id, manager_id=mgr))
    await store.touch({rec.id: (mgr, time.time())})
    now = time.time()
    await store.fenced(mgr, "chk", token, [store.update_op(rec.id, {"status": "exited"}, now),
                                          *store.event_op(Event(type="stopped", node_id=rec.id, manager_id=mgr))])
    await store.fenced(mgr, "chk", token, [*store.delete_ops(rec),
                                          *store.event_op(Event(type="released", node_id=rec.id, manager_id=mgr))])


async def checker_pass(store: Store, mgr: str, token: int) -> float:
    """The store's part of one checker pass of a manager_id: its records, idle scan, intents, pool and
    a fenced write; seconds."""
    t0 = time.perf_counter()
    ids = await store.manager_node_ids(mgr)
    await store.get_nodes(ids)
    await store.idle_since(mgr, time.time() - 60)
    await store.intents(mgr)
    await store.leases.renew(mgr, f"chk:{token}", 30000)
    await store.fenced(mgr, "chk", token, [store.cycle_count_op(mgr, token)])
    return time.perf_counter() - t0


async def reader(store: Store, mgr: str, stop: asyncio.Event, got: list[int], i: int) -> None:
    """A replica of mgr: its own event hub (manager/events/hub.py), counting what it is handed."""

    def count(_ev: Event) -> None:
        got[i] += 1

    hub = EventHub(store, AddressCache(30.0), count, manager_id=mgr)
    task = asyncio.create_task(hub.run())
    await stop.wait()
    hub.stop()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def one_run(target: Target, primaries: set[int], n_mgr: int, args: argparse.Namespace) -> dict[str, Any]:
    prefix = f"scale-{uuid.uuid4().hex[:6]}"
    store = target.open(prefix)
    mgrs = [f"mgr-{i:04d}" for i in range(n_mgr)]
    try:
        tokens = {}
        for m in mgrs:
            tokens[m] = await store.leases.acquire(m, "chk", 600000)
        before = target.info()
        sem = asyncio.Semaphore(64)

        async def put(m: str, j: int) -> None:
            async with sem:
                client = f"client-{j % 50}"
                member = await store.reserve(m, per_manager=0, total=0, client=client, per_client=100000)
                rec = _rec(store, m, client)
                rec.status = NodeStatus.RUNNING
                await store.put_node(rec, replace_member=member)

        await asyncio.gather(*(put(m, j) for m in mgrs for j in range(args.sessions)))
        populated = target.info()
        mem_per_session = (_mem(populated, target.ports, primaries) - _mem(before, target.ports, primaries)) / (
            n_mgr * args.sessions)

        stop = asyncio.Event()
        got = [0] * min(args.readers, n_mgr)
        readers = [asyncio.create_task(reader(store, mgrs[i], stop, got, i)) for i in range(len(got))]
        await asyncio.sleep(1.5)  # each hub follows its streams
        start_info = target.info()
        rate = n_mgr * args.churn
        done = 0
        t0 = time.monotonic()
        pending: set[asyncio.Task[None]] = set()
        while time.monotonic() - t0 < args.seconds:
            due = int((time.monotonic() - t0) * rate) - done
            for _ in range(max(0, due)):
                m = mgrs[done % n_mgr]

                async def go(m: str = m, n: int = done) -> None:
                    async with sem:
                        await lifecycle(store, m, tokens[m], n)

                pending.add(asyncio.create_task(go()))
                done += 1
            pending = {t for t in pending if not t.done()}
            await asyncio.sleep(0.01)
        await asyncio.gather(*pending)
        elapsed = time.monotonic() - t0
        await asyncio.sleep(0.5)  # the readers catch up
        stop.set()
        await asyncio.gather(*readers)
        end_info = target.info()
        passes = [await checker_pass(store, m, tokens[m]) for m in mgrs[:: max(1, n_mgr // 20)]]
        # the cluster-wide upkeep (checker/upkeep.py), one pass over every manager_id: the counts'
        # recount (its readings; nothing is off, so no settle) and the scan for streams of manager_ids gone
        for m in mgrs:
            await store.heartbeat(ReplicaInfo(replica_id=f"r-{m}", manager_id=m, url="", version="1",
                                              started_at=time.time()), 60)
        upkeep = Upkeep(store, msgspec.convert({"checker": {"recount_settle_seconds": 0}}, Config))
        t_up = time.perf_counter()
        done_upkeep = await upkeep.run()
        upkeep_ms = 1000 * (time.perf_counter() - t_up)
        per_replica = statistics.mean(got) / elapsed
        return {
            "target": target.name, "manager_ids": n_mgr, "lifecycles": done, "seconds": round(elapsed, 1),
            "events_per_s": round(done * 4 / elapsed, 1),
            "per_replica_deliveries_per_s": round(per_replica, 1),
            "all_replicas_deliveries_per_s": round(per_replica * n_mgr, 1),
            "redis_cpu_pct": round(100 * (_cpu(end_info) - _cpu(start_info)) / elapsed, 1),
            "memory_per_session_bytes": round(mem_per_session),
            "commands_per_lifecycle": round((_calls(end_info, target.ports, primaries)
                                             - _calls(start_info, target.ports, primaries)) / max(1, done), 1),
            "checker_pass_ms": round(1000 * statistics.median(passes), 2),
            "upkeep_pass_ms": round(upkeep_ms, 1),
            "upkeep_corrected": len(done_upkeep.recounted) + len(done_upkeep.streams_removed),
        }
    finally:
        await store.close()


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    sizes = [int(x) for x in args.managers.split(",")]
    rows = []
    if args.target in ("both", "redis"):
        with tempfile.TemporaryDirectory() as tmp:
            proc, url = start_private_redis(Path(tmp))
            try:
                port = int(url.rsplit(":", 1)[1].split("/")[0])
                t = Target("one Redis", {"url": url}, [port])
                for n in sizes:
                    rows.append(await one_run(t, {port}, n, args))
                    print(rows[-1], flush=True)
            finally:
                proc.kill()
                proc.wait()
    if args.target in ("both", "cluster"):
        c = RedisCluster().start()
        try:
            t = Target("Redis Cluster (3+3)", {"url": redis_env.private_url("127.0.0.1", c.ports[0]),
                                               "cluster_nodes": c.seeds[:3]}, list(c.ports))
            primaries = set(c.primaries())
            for n in sizes:
                rows.append(await one_run(t, primaries, n, args))
                print(rows[-1], flush=True)
        finally:
            c.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--managers", default="10,100,1000")
    ap.add_argument("--churn", type=float, default=0.1, help="session lifecycles per manager_id per second")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--sessions", type=int, default=10, help="live session records per manager_id")
    ap.add_argument("--readers", type=int, default=10, help="replicas that follow the events (sampled)")
    ap.add_argument("--target", choices=["both", "redis", "cluster"], default="both")
    args = ap.parse_args()
    rows = asyncio.run(run(args))
    cols = ["target", "manager_ids", "lifecycles", "events_per_s", "per_replica_deliveries_per_s",
            "all_replicas_deliveries_per_s", "redis_cpu_pct", "memory_per_session_bytes", "commands_per_lifecycle",
            "checker_pass_ms", "upkeep_pass_ms"]
    print(markdown_table(cols, [[r[c] for c in cols] for r in rows]))
    write_json("store_scale", {"command": command_line(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
