"""Redis Sentinel for real (README: `redis.sentinels`): a primary, a replica and three sentinels
(Debian's redis-sentinel) on loopback, private to the test. The primary is killed while a client
loop calls tools through two manager replicas configured for Sentinel; the sentinels promote the
replica, the managers follow it, and no session is lost. The time to recover is printed."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from testing import redis_env
from testing.harness import free_port, report, stop_process
from tests.conftest import wait_for
from tests.test_tiers import read, write

MASTER = "tsmtest"
DB = 2
DOWN_AFTER_MS = 1000


class SentinelSet:
    """A primary, a replica of it and three sentinels watching it, each a process of this test."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.password = redis_env.password()
        self.ports = {"primary": free_port(), "replica": free_port()}
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def _server(self, name: str, *extra: str) -> None:
        port = self.ports[name]
        self.procs[name] = subprocess.Popen(
            ["redis-server", *redis_env.private_server_args(port), "--save", "", "--appendonly", "no",
             "--dir", str(self.tmp), "--logfile", str(self.tmp / f"{name}.log"), *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start(self) -> SentinelSet:
        self._server("primary")
        # the replica authenticates to the primary with the same password (a root-only file, not argv)
        auth = self.tmp / "masterauth.conf"
        auth.touch(mode=0o600)
        auth.write_text(f"masterauth {self.password}\n")
        self._server("replica", "--include", str(auth), "--replicaof", "127.0.0.1", str(self.ports["primary"]))
        # each sentinel is told its own id and the others' (and the replica) up front, rather than
        # finding them through hello messages every 2 s: the set is ready in a second, not several
        ids = [uuid.uuid4().hex + uuid.uuid4().hex[:8] for _ in self.sentinel_ports]
        for i, port in enumerate(self.sentinel_ports):
            conf = self.tmp / f"sentinel-{i}.conf"  # sentinel rewrites its own config: one file each
            conf.touch(mode=0o600)
            known = "".join(f"sentinel known-sentinel {MASTER} 127.0.0.1 {p} {ids[j]}\n"
                            for j, p in enumerate(self.sentinel_ports) if j != i)
            conf.write_text(f"port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {self.tmp}\n"
                            f"logfile {self.tmp / f'sentinel-{i}.log'}\nsentinel myid {ids[i]}\n"
                            f"sentinel monitor {MASTER} 127.0.0.1 {self.ports['primary']} 2\n"
                            f"sentinel auth-pass {MASTER} {self.password}\n"
                            f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n"
                            f"sentinel failover-timeout {MASTER} 10000\n"
                            f"sentinel known-replica {MASTER} 127.0.0.1 {self.ports['replica']}\n{known}")
            self.procs[f"sentinel-{i}"] = subprocess.Popen(["redis-sentinel", str(conf)],
                                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # ready when the replica is in sync and every sentinel knows the replica and the two others
        wait_for(lambda: self.node("replica").info("replication").get("master_link_status") == "up",
                 timeout=20, what="the replica in sync")
        for port in self.sentinel_ports:
            wait_for(lambda p=port: self._sees_all(p), timeout=30, what=f"sentinel {port} seeing the others")
        return self

    def _sees_all(self, port: int) -> bool:
        try:
            with redis.Redis(port=port, socket_timeout=1) as s:
                return (len(s.sentinel_slaves(MASTER)) == 1 and len(s.sentinel_sentinels(MASTER)) == 2)
        except redis.RedisError:
            return False

    def node(self, name: str) -> redis.Redis:
        return redis.Redis(port=self.ports[name], password=self.password, db=DB, socket_timeout=2,
                           decode_responses=True)

    def master_port(self) -> int:
        with redis.Redis(port=self.sentinel_ports[0], socket_timeout=1) as s:
            return int(s.sentinel_get_master_addr_by_name(MASTER)[1])

    def in_sync(self) -> bool:
        """The replica has everything the primary has acknowledged so far."""
        with self.node("primary") as p, self.node("replica") as r:
            return int(r.info("replication")["master_repl_offset"]) >= int(p.info("replication")["master_repl_offset"])

    def kill(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait()

    def close(self) -> None:
        for proc in self.procs.values():
            stop_process(proc, 5)


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelSet]:
    s = SentinelSet(tmp_path)
    try:
        yield s.start()
    finally:
        s.close()


def test_managers_follow_a_sentinel_promotion_and_lose_no_session(sentinels: SentinelSet, start_manager,  # type: ignore[no-untyped-def]
                                                                  prefix: str) -> None:
    # with sentinels, the URL's host is not used; its database and password are the master's (README)
    redis_cfg = {"url": redis_env.private_url("127.0.0.1", sentinels.ports["primary"], db=DB), "socket_timeout_seconds": 0.5,
                 "sentinels": [f"127.0.0.1:{p}" for p in sentinels.sentinel_ports], "sentinel_master": MASTER}
    reps = [start_manager(name=f"s{i}", redis=redis_cfg) for i in range(2)]
    sessions: list[tuple[httpx.Client, str, bytes]] = []
    for i in range(4):  # made through either replica
        c = httpx.Client(base_url=reps[i % 2].url, timeout=30)
        r = c.post("/get_cookie")
        assert r.status_code == 200, r.text
        mark = uuid.uuid4().hex.encode()
        write(c, "mark.txt", mark)
        sessions.append((c, r.cookies["node_id"], mark))
    with sentinels.node("primary") as p:
        assert p.scard(f"{prefix}:mgr:{reps[0].cfg['manager_id']}:nodes") == 4  # the records are on the primary
    wait_for(sentinels.in_sync, timeout=10, what="the replica holding every record")

    # the client loop: each session called through each replica in turn, until told to stop
    results: list[tuple[float, str, int]] = []  # (when, what, status; 0: no answer)
    stop = threading.Event()

    def loop() -> None:
        clients = [httpx.Client(base_url=m.url, timeout=10) for m in reps]
        while not stop.is_set():
            for _c, node_id, _ in sessions:
                for m, mc in zip(reps, clients):
                    mc.cookies.set("node_id", node_id)
                    try:
                        code = mc.post("/get_available_tools").status_code
                    except httpx.HTTPError:
                        code = 0
                    results.append((time.monotonic(), f"tools {node_id[:8]} via {m.replica_id}", code))
                    try:
                        code = mc.get("/ready").status_code  # Redis on each request: sees the outage
                    except httpx.HTTPError:
                        code = 0
                    results.append((time.monotonic(), f"ready via {m.replica_id}", code))
        for mc in clients:
            mc.close()

    worker = threading.Thread(target=loop, daemon=True)
    worker.start()
    wait_for(lambda: len(results) > 16, what="the client loop running")
    killed = time.monotonic()
    sentinels.kill("primary")
    wait_for(lambda: sentinels.master_port() == sentinels.ports["replica"], timeout=30, interval=0.1,
             what="the sentinels promoting the replica")
    promoted = time.monotonic()

    def recovered() -> bool:  # a full round after the promotion, every call answered 200
        later = [(what, code) for t, what, code in results if t > promoted + 0.5]
        return len(later) >= 4 * len(sessions) * len(reps) and all(code == 200 for _, code in later[-16:])

    wait_for(recovered, timeout=60, interval=0.1, what="every call answered again")
    stop.set()
    worker.join(30)
    first_ok = min(t for t, what, code in results if t > promoted and what.startswith("ready") and code == 200)
    failed = [(round(t - killed, 2), what, code) for t, what, code in results if t > killed and code != 200]
    report(f"sentinel failover: promotion {promoted - killed:.2f} s after the primary was killed (down-after "
           f"{DOWN_AFTER_MS} ms); managers serving again (time to recover) {first_ok - killed:.2f} s after it; "
           f"{len(failed)} of {len([r for r in results if r[0] > killed])} calls failed meanwhile, all of them /ready")
    # tool calls never needed Redis to go on: none failed
    assert not [f for f in failed if f[1].startswith("tools")], failed

    # no session lost: each answers with its file through either replica, and the new primary has them all
    for c, node_id, mark in sessions:
        for m in reps:
            c.base_url = httpx.URL(m.url)
            assert read(c, "mark.txt") == mark, node_id
    with sentinels.node("replica") as new_primary:
        assert new_primary.info("replication")["role"] == "master"
        assert new_primary.scard(f"{prefix}:mgr:{reps[0].cfg['manager_id']}:nodes") == 4
    # and the managers write to the new primary: a new session through each replica
    for m in reps:
        c = httpx.Client(base_url=m.url, timeout=30)
        r = c.post("/get_cookie")
        assert r.status_code == 200, (r.text, m.logs()[-3000:])
        assert c.post("/release_session").status_code == 200
    for c, _, _ in sessions:
        assert c.post("/release_session").status_code == 200
    for m in reps:
        assert m.proc is not None and m.proc.poll() is None
