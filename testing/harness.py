"""Manager replicas and HAProxy as real processes on 127.0.0.1, for tests and benchmarks alike."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from shared.config import deep_merge
from testing import machine, redis_env

ROOT = Path(__file__).resolve().parents[1]


FIGURES: list[str] = []  # measured by tests, printed at the end of the run (tests/conftest.py)


def report(line: str) -> None:
    """A figure a test measured, for the run's summary (pytest captures a test's own output)."""
    FIGURES.append(line)


_GIVEN: set[int] = set()  # ports free_port has handed out in this process

# The ports the suite hands out: below the kernel's ephemeral range (32768-60999 by default, where
# every outgoing connection and every bind to port 0 takes one) and below Kubernetes' NodePort range
# (30000-32767, which kube-proxy catches on the host's addresses). Each xdist worker probes its own
# slice: two workers probing one kernel could both find a port free and both use it, and a manager
# whose port was taken looked started because the other one answered its /alive (CI: a 404 for
# /admin/nodes from a manager without admin routes).
SUITE_PORTS = range(20000, 30000)


def _worker_ports() -> range:
    """This pytest-xdist worker's slice of SUITE_PORTS (all of it outside xdist)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    index = int(worker[2:]) if worker[:2] == "gw" and worker[2:].isdigit() else 0
    size = len(SUITE_PORTS) // max(count, 1)
    start = SUITE_PORTS.start + (index % max(count, 1)) * size
    return range(start, start + size)


def free_port() -> int:
    """A port of this worker's slice that is free on 127.0.0.1 and was not handed out before in this
    process (a closed probe's port is free again for the next probe). From a random point of the
    slice, so separate runs side by side seldom meet; ManagerProc checks who answers anyway."""
    ports = _worker_ports()
    first = random.randrange(len(ports))
    for i in range(len(ports)):
        port = ports[(first + i) % len(ports)]
        if port in _GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    raise RuntimeError(f"no free port left in {ports.start}-{ports.stop - 1}")


def bridge_gateway(client: Any, network: str) -> str:
    """The host's IPv4 address on an engine's bridge network, read from the bridge interface.

    Not the network's IPAM ``Gateway``: a dockerd started for the first time leaves that key out of
    its default ``bridge`` (it appears only after a restart). ``client``: a DockerClient."""
    net = client.api.inspect_network(network)
    dev = (net.get("Options") or {}).get("com.docker.network.bridge.name") or f"br-{net['Id'][:12]}"
    out = subprocess.run(["ip", "-j", "-4", "addr", "show", "dev", dev], capture_output=True, text=True,
                         check=True).stdout
    (link,) = json.loads(out)
    return str(link["addr_info"][0]["local"])


def stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after timeout."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class PrivateRedis:
    """A redis-server of a test's own on 127.0.0.1 and a free port (nothing saved): faults are done
    to it (killed, started again on the same port), never to the machine's or the project's."""

    def __init__(self, tmp: Path, port: int | None = None, args: list[str] | None = None) -> None:
        self.port = port or free_port()
        self.tmp = tmp
        self.args = args or []
        # it wants the project's password like the project's own Redis: a local user gets nothing
        self.url = redis_env.private_url("127.0.0.1", self.port)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> PrivateRedis:
        import redis

        self.proc = subprocess.Popen(["redis-server", *redis_env.private_server_args(self.port),
                                      "--save", "", "--appendonly", "no", "--dir", str(self.tmp), *self.args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        with redis.Redis.from_url(self.url, socket_timeout=0.5) as client:
            while time.monotonic() < deadline:
                with contextlib.suppress(redis.RedisError):
                    if client.ping():
                        return self
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server on port {self.port} exited with {self.proc.returncode}")
                time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} did not answer")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _replica_at(url: str) -> str | None:
    """The replica id a manager at url says it is (x-tsm-replica) when its /alive answers 200."""
    with contextlib.suppress(httpx.HTTPError):
        r = httpx.get(url + "/alive", timeout=1)
        if r.status_code == 200:
            return r.headers.get("x-tsm-replica", "")
    return None


def _answers(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(url, timeout=1).status_code == 200
    return False


class ManagerProc:
    """One manager replica (``python -m manager.main --config``) on 127.0.0.1 and a free port."""

    def __init__(self, cfg: dict[str, Any], tmp: Path, name: str = "m") -> None:
        self.port = free_port()
        self.cfg = deep_merge(json.loads(json.dumps(cfg)), {"host": "127.0.0.1", "port": self.port})
        machine.RUN.manager_ids.add(str(self.cfg.get("manager_id", "")))  # what the run must clean up
        if int(self.cfg.get("workers", 1)) <= 1:  # several workers: each makes its own replica_id
            self.cfg.setdefault("replica_id", f"{name}-{self.port}")
        self.url = f"http://127.0.0.1:{self.port}"
        # the console's own origin: a free port of its own unless the config names one
        self.cfg.setdefault("admin", {}).setdefault("console_port", free_port())
        self.console_url = f"http://127.0.0.1:{self.cfg['admin']['console_port']}"
        self.path = tmp / f"{name}-{self.port}.yml"
        self.log_path = tmp / f"{name}-{self.port}.log"
        self.path.write_text(yaml.safe_dump(self.cfg))
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def replica_id(self) -> str:
        return str(self.cfg.get("replica_id", ""))

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, wait: bool = True, timeout: float = 60.0) -> ManagerProc:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TSM_")}
        self._log = open(self.log_path, "ab")  # noqa: SIM115  (the child writes to it until stop() closes it)
        self.proc = subprocess.Popen([sys.executable, "-m", "manager.main", "--config", str(self.path)],
                                     cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        if wait:
            self.wait_alive(timeout)
        return self

    def wait_alive(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"manager exited with {self.proc.returncode}:\n{self.logs()[-6000:]}")
            answering = _replica_at(self.url)
            if answering is not None:
                if self.replica_id and answering != self.replica_id:
                    # another process holds the port: this one will exit for it; never test that one
                    raise RuntimeError(f"port {self.port} is answered by replica {answering!r}, not by "
                                       f"{self.replica_id!r}:\n{self.logs()[-6000:]}")
                return
            time.sleep(0.05)
        raise RuntimeError(f"manager did not answer /alive:\n{self.logs()[-6000:]}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> int | None:
        """Graceful stop (a stopped, SIGSTOPped process is continued first), SIGKILL after timeout."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            stop_process(self.proc, timeout)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# The README's load-balancer config: a request that fails on one replica is retried on another.
# A connection refused or reset before the request was sent is retried whatever the method; one
# that got no answer (the replica died with it in flight) only when it is idempotent (GET, HEAD):
# a tool call or get_cookie may have been carried out before the replica died.
HAPROXY_RETRY = """\
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response junk-response response-timeout
    http-request disable-l7-retry unless METH_GET
"""


class HAProxy:
    """HAProxy on 127.0.0.1 in front of manager replicas, retrying on another replica as the
    README shows: (name, port) each on 127.0.0.1, or (name, address, port) for a replica elsewhere
    (a test host's namespace); balance: roundrobin, or first (every request to the first live)."""

    def __init__(self, backends: list[tuple[str, int]] | list[tuple[str, str, int]], tmp: Path,
                 balance: str = "roundrobin") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        servers = "\n".join(f"    server {b[0]} {'127.0.0.1' if len(b) == 2 else b[1]}:{b[-1]} "
                            f"check inter 300 fall 2 rise 1" for b in backends)
        cfg = tmp / f"haproxy-{self.port}.cfg"
        cfg.write_text(f"""
global
    maxconn 4000
defaults
    mode http
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    option http-keep-alive
frontend fe
    bind 127.0.0.1:{self.port}
    default_backend managers
backend managers
    balance {balance}
    option httpchk GET /alive
{HAPROXY_RETRY}{servers}
""")
        self.proc = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                                     stderr=open(tmp / "haproxy.log", "ab"))  # noqa: SIM115  (haproxy owns it)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if _answers(self.url + "/alive"):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited with {self.proc.returncode}")
            time.sleep(0.05)
        raise RuntimeError("haproxy did not answer")

    def stop(self) -> None:
        stop_process(self.proc, 5)


def remove_project_objects(client: Any, manager_id: str) -> int:
    """Everything a manager_id made on an engine (containers, workspace volumes with their loop
    images, the node network and its firewall exceptions); returns how many containers there were. ``client``: a DockerClient."""
    import docker

    from shared import firewall
    from shared.egress import nft as egress_nft
    from shared.engines.docker import loopdisk

    label = f"toolserver-manager.manager_id={manager_id}"
    n = 0
    # sparse: no inspect per container listed, which fails for one the checker removes meanwhile
    for c in client.containers.list(all=True, sparse=True, filters={"label": label}):
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            c.remove(force=True, v=True)
            n += 1
    for v in client.volumes.list(filters={"label": label}):
        image = (v.attrs.get("Labels") or {}).get("toolserver-manager.image_file", "")
        _remove_in_time(v.remove, force=True)
        if image:
            loopdisk.destroy(image)
    for net in client.networks.list(filters={"label": label}):
        _remove_in_time(net.remove)
    with contextlib.suppress(firewall.NoPrivilege, firewall.FirewallError):
        firewall.prune_allow()  # a network's firewall exceptions go with it
    with contextlib.suppress(firewall.NoPrivilege, egress_nft.NftError):
        egress_nft.prune()  # and its egress table (egress.enforce)
    return n


def _remove_in_time(remove: Any, **kw: Any) -> None:
    # the engine lets go of a removed container's volumes and endpoints a moment after it answers
    import docker

    for _ in range(20):
        try:
            remove(**kw)
            return
        except docker.errors.NotFound:
            return
        except docker.errors.APIError:
            time.sleep(0.1)
