"""A real Redis Cluster for tests and benchmarks: six Debian ``redis-server`` processes in cluster
mode on loopback ports picked here (three primaries, three replicas, joined by
``redis-cli --cluster create``), each wanting the project's password, all in one temp directory
that ``close()`` removes with the processes. Faults are done to it (a primary killed with -9),
never to the machine's or the project's Redis."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis
from redis.crc import key_slot

from testing import redis_env
from testing.harness import free_port


def _free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(200):
        port = free_port()  # never one already given to another node of the cluster
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisCluster:
    """Six cluster nodes on 127.0.0.1; ``seeds`` are their "host:port" for redis.cluster.nodes."""

    def __init__(self, size: int = 6, node_timeout_ms: int = 1000) -> None:
        self.size = size
        self.node_timeout_ms = node_timeout_ms
        self.dir = Path(tempfile.mkdtemp(prefix="tsm-redis-cluster-"))
        os.chmod(self.dir, 0o700)  # the config files hold the password
        self.ports: list[int] = []
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.password = redis_env.password()

    @property
    def seeds(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.ports]

    def start(self, timeout: float = 30.0) -> RedisCluster:
        try:
            for _ in range(self.size):
                port = _free_cluster_port()
                self.ports.append(port)
                self._spawn(port)
            for port in self.ports:
                self._wait_ping(port, timeout)
            env = {**os.environ, "REDISCLI_AUTH": self.password}  # never on a command line
            subprocess.run(["redis-cli", "--cluster", "create", *self.seeds, "--cluster-replicas", "1",
                            "--cluster-yes"], check=True, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, timeout=timeout)
            self.wait_ok(timeout)
        except BaseException:
            self.close()
            raise
        return self

    def _spawn(self, port: int) -> None:
        node_dir = self.dir / str(port)
        node_dir.mkdir(exist_ok=True)
        conf = node_dir / "redis.conf"
        old = os.umask(0o077)
        try:
            # masterauth: a replica authenticates to its primary with the same password
            conf.write_text(f"requirepass {self.password}\nmasterauth {self.password}\n"
                            f"port {port}\nbind 127.0.0.1\ndir {node_dir}\ncluster-enabled yes\n"
                            f"cluster-config-file nodes.conf\ncluster-node-timeout {self.node_timeout_ms}\n"
                            "save \"\"\nappendonly no\ncluster-require-full-coverage no\n")
        finally:
            os.umask(old)
        self.procs[port] = subprocess.Popen(["redis-server", str(conf)], stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL)

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, password=self.password, socket_timeout=1)

    def _wait_ping(self, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.client(port) as c:
            while time.monotonic() < deadline:
                with contextlib.suppress(redis.RedisError):
                    if c.ping():
                        return
                if self.procs[port].poll() is not None:
                    raise RuntimeError(f"cluster node {port} exited with {self.procs[port].returncode}")
                time.sleep(0.02)
        raise RuntimeError(f"cluster node {port} did not answer")

    def info(self, port: int) -> dict[str, str]:
        with self.client(port) as c:
            raw = c.execute_command("CLUSTER", "INFO")
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        return dict(line.split(":", 1) for line in text.strip().splitlines() if ":" in line)

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every live node says cluster_state:ok with all 16384 slots served."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                if all(self.info(p).get("cluster_state") == "ok" and self.info(p).get("cluster_slots_ok") == "16384"
                       for p in self.live_ports()):
                    return
            time.sleep(0.05)
        raise RuntimeError("the cluster did not reach cluster_state:ok")

    def wait_synced(self, timeout: float = 30.0) -> None:
        """Until each live replica's link to its primary is up (a replica that never synced
        cannot be promoted: a failover test waits for this before it kills a primary)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                links = []
                for p in self.live_ports():
                    with self.client(p) as c:
                        rep = c.info("replication")
                    if rep["role"] == "slave":
                        links.append(rep.get("master_link_status") == "up")
                if len(links) >= len(self.live_ports()) // 2 and all(links):
                    return
            time.sleep(0.05)
        raise RuntimeError("the cluster's replicas did not sync")

    def live_ports(self) -> list[int]:
        return [p for p, proc in self.procs.items() if proc.poll() is None]

    def role(self, port: int) -> str:
        with self.client(port) as c:
            return str(c.info("replication")["role"])

    def primaries(self) -> list[int]:
        return [p for p in self.live_ports() if self.role(p) == "master"]

    def primary_of(self, key: str) -> int:
        """The port of the live primary that serves key's slot."""
        slot = key_slot(key.encode())
        with self.client(self.live_ports()[0]) as c:
            for start, end, primary, *_ in c.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return int(primary[1])
        raise RuntimeError(f"no node serves slot {slot}")

    def kill(self, port: int) -> None:
        """kill -9 one node (a crash: no shutdown, no failover handshake)."""
        proc = self.procs[port]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
