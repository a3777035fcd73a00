"""Several hosts on one machine, for tests of a cluster across hosts and its faults.

Each host is a network namespace joined to a bridge in the root namespace by a veth
pair, with its own dockerd (own socket, data root, exec root, pidfile; its containers,
bridges and published ports live in the namespace) and its own manager replica with
``manager_id`` = the host's name, listening and publishing node ports on the host's
address. One Redis on the bridge address of the root namespace serves them all; HAProxy
(testing.harness.HAProxy) goes in front. Faults are real: a manager killed, the host's
link set down, the host crashed (manager, containers and dockerd killed at once).

Everything made is named after one random tag, and ``Hosts.close`` removes it all:
containers by label, dockerds and their data, namespaces, the bridge, the forward rule.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
import yaml

from shared.config import deep_merge
from testing import machine
from testing.harness import ROOT, ManagerProc, free_port, remove_project_objects, stop_process
from testing.redis_env import private_server_args, private_url

STATE = Path(os.environ.get("TSM_STATE_DIR", "/var/lib/toolserver-manager"))
IMAGE_CACHE = STATE / "image-cache"
MANAGER_PORT = 8080  # each host has its own ports: every manager listens on the same one


def sh(*cmd: str, check: bool = True, ns: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command (in a namespace when ns is given); its output is returned, errors raise."""
    argv = ["ip", "netns", "exec", ns, *cmd] if ns else list(cmd)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()[:500]}")
    return proc


def in_netns(ns: str) -> list[str]:
    """The prefix that runs a command in a namespace's network only: `ip netns exec` also gives it a
    fresh /sys without the cgroup mounts dockerd needs."""
    return ["nsenter", f"--net=/run/netns/{ns}", "--"]


def saved_image(image: str) -> Path:
    """The node image as a `docker save` tar, made once per image id (a cache across runs)."""
    image_id = sh("/usr/bin/docker", "image", "inspect", "-f", "{{.Id}}", image).stdout.strip()
    path = IMAGE_CACHE / f"{image_id.split(':')[-1][:16]}.tar"
    if not path.exists():
        IMAGE_CACHE.mkdir(parents=True, exist_ok=True)
        for old in IMAGE_CACHE.glob("*.tar"):  # one image at a time: older builds are dead weight
            old.unlink(missing_ok=True)
        tmp = path.with_suffix(".part")
        sh("/usr/bin/docker", "save", "-o", str(tmp), image)
        tmp.rename(path)
    return path


class HostManager(ManagerProc):
    """A manager replica run inside a host's network namespace, on the host's address."""

    def __init__(self, cfg: dict[str, Any], tmp: Path, ns: str, addr: str) -> None:
        super().__init__(cfg, tmp, name=ns)
        self.ns = ns
        self.port = MANAGER_PORT
        self.cfg.update(host=addr, port=MANAGER_PORT, replica_id=f"{ns}-r1",
                        advertise_url=f"http://{addr}:{MANAGER_PORT}")
        self.url = f"http://{addr}:{MANAGER_PORT}"
        self.path.write_text(yaml.safe_dump(self.cfg))

    def start(self, wait: bool = True, timeout: float = 30.0) -> HostManager:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TSM_")}
        if self._log is None:
            self._log = open(self.log_path, "ab")  # noqa: SIM115  (the child writes to it until stop() closes it)
        self.proc = subprocess.Popen([*in_netns(self.ns), sys.executable, "-m", "manager.main",
                                      "--config", str(self.path)],
                                     cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        if wait:
            self.wait_alive(timeout)
        return self


@dataclass
class Host:
    """One host: its namespace, address, engine and manager."""

    name: str  # namespace name and manager_id
    addr: str
    veth: str  # the root-namespace end of its link
    sock: str
    data_root: Path
    exec_root: Path
    log: Path
    dockerd: subprocess.Popen[bytes] | None = None
    manager: HostManager | None = None
    dockerd_args: list[str] = field(default_factory=list)  # beyond socket, roots and pidfile
    # a command dockerd runs under (testing/kube.py: a mount namespace of the host's own)
    dockerd_wrap: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def docker_host(self) -> str:
        return f"unix://{self.sock}"

    def docker(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh("/usr/bin/docker", "-H", self.docker_host, *args, check=check)

    def engine_answers(self) -> bool:
        return self.docker("info", "--format", "{{.ID}}", check=False).returncode == 0

    def start_dockerd(self, timeout: float = 30.0) -> None:
        """This host's dockerd inside its namespace (own bridge, iptables and published ports)."""
        self.data_root.mkdir(parents=True, exist_ok=True)
        self.exec_root.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.dockerd = subprocess.Popen(
                [*in_netns(self.name), *self.dockerd_wrap, "dockerd", "--host", self.docker_host,
                 "--data-root", str(self.data_root), "--exec-root", str(self.exec_root),
                 "--pidfile", f"{self.exec_root}.pid", *self.dockerd_args],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.engine_answers():
                return
            if self.dockerd.poll() is not None:
                raise RuntimeError(f"dockerd of {self.name} exited: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)
        raise RuntimeError(f"dockerd of {self.name} did not answer: {self.log.read_text()[-2000:]}")

    def engine_pids(self) -> list[int]:
        """dockerd, its containerd and the shims: every process naming this host's exec root."""
        mark = str(self.exec_root).encode()
        pids = []
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                with contextlib.suppress(OSError):
                    if mark in (p / "cmdline").read_bytes():
                        pids.append(int(p.name))
        if self.dockerd is not None and self.dockerd.poll() is None:
            pids.append(self.dockerd.pid)
        return sorted(set(pids))

    def kill_engine(self) -> None:
        """A crash: the containers die with their engine (SIGKILL to the containers, then to dockerd,
        containerd and the shims)."""
        ids = self.docker("ps", "-q", check=False).stdout.split()
        if ids:
            self.docker("kill", *ids, check=False)
        for pid in self.engine_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.dockerd is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.dockerd.wait(10)

    def stop_dockerd(self, keep_containers: bool = False) -> None:
        """Stop dockerd; then kill its containerd and shims, unless keep_containers (live-restore:
        the containers run on, and the engine finds them again when it starts)."""
        if self.dockerd is not None and self.dockerd.poll() is None:
            stop_process(self.dockerd, 20)
        if keep_containers:
            return
        for pid in self.engine_pids():  # containerd and shims left behind by a killed dockerd
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def link(self, up: bool) -> None:
        """Cut or restore this host's only link (the root end of its veth pair)."""
        sh("ip", "link", "set", self.veth, "up" if up else "down")


class Hosts:
    """N hosts, one Redis, HAProxy in front; ``close`` removes everything they made."""

    def __init__(self, tmp: Path, image: str, n: int = 2, manager_overrides: dict[str, Any] | None = None,
                 internal_token: str = "hosts-internal-token", admin_token: str = "hosts-admin-token") -> None:
        self.tmp = tmp
        self.internal_token = internal_token
        self.admin_token = admin_token
        self.image = image
        self.tag = uuid.uuid4().hex[:4]
        machine.RUN.host_tags.add(self.tag)
        self.bridge = f"tsmhbr{self.tag}"
        self.subnet = self._free_subnet()
        self.gateway = f"{self.subnet}.1"
        self.redis_port = free_port()
        self.redis_url = private_url(self.gateway, self.redis_port)
        self.redis: subprocess.Popen[bytes] | None = None
        self.hosts: list[Host] = []
        self.overrides = manager_overrides or {}
        self.marker = Path(f"/run/tsmh-{self.tag}.started")
        self._forward_rule = ["FORWARD", "-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT"]
        self.timings: dict[str, float] = {}
        for i in range(1, n + 1):
            name = f"host{i}-{self.tag}"
            machine.RUN.manager_ids.add(name)
            run = f"/run/tsmh-{self.tag}-{i}"
            self.hosts.append(Host(name=name, addr=f"{self.subnet}.{10 + i}", veth=f"tsmh{self.tag}v{i}",
                                   sock=f"{run}.sock", data_root=STATE / f"tsmh-{self.tag}-{i}",
                                   exec_root=Path(run), log=tmp / f"dockerd-{name}.log"))

    @staticmethod
    def _free_subnet() -> str:
        used = sh("ip", "-4", "addr").stdout
        for _ in range(50):
            net = f"10.231.{random.randint(1, 254)}"
            if f"{net}." not in used:
                return net
        raise RuntimeError("no free 10.231.x.0/24 subnet for the test hosts")

    # --- set-up -------------------------------------------------------------------
    def start(self, managers: bool = True) -> Hosts:
        t0 = time.monotonic()
        sweep_stale()
        self.marker.touch()  # until its engines run, this marks the tag as a run setting up
        try:
            self._network()
            self._start_redis()
            image = saved_image(self.image)
            self.timings["image_saved"] = time.monotonic() - t0
            with ThreadPoolExecutor(len(self.hosts)) as pool:
                list(pool.map(lambda h: self._start_engine(h, image), self.hosts))
            self.timings["engines_ready"] = time.monotonic() - t0
            for h in self.hosts if managers else []:
                h.manager = HostManager(self.manager_config(h), self.tmp, h.name, h.addr)
                h.manager.start(wait=False)
            for h in self.hosts if managers else []:
                assert h.manager is not None
                h.manager.wait_alive(60)
            self.timings["managers_alive"] = time.monotonic() - t0
        except BaseException:
            self.close()
            raise
        return self

    def _network(self) -> None:
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        # bridged traffic between hosts crosses the root namespace's FORWARD chain (br_netfilter),
        # whose policy dockerd sets to DROP
        sh("iptables", "-I", *self._forward_rule)
        for i, h in enumerate(self.hosts, 1):
            sh("ip", "netns", "add", h.name)
            inner = f"tsmh{self.tag}i{i}"
            sh("ip", "link", "add", h.veth, "type", "veth", "peer", "name", inner)
            sh("ip", "link", "set", inner, "netns", h.name)
            sh("ip", "link", "set", h.veth, "master", self.bridge)
            sh("ip", "link", "set", h.veth, "up")
            sh("ip", "link", "set", "lo", "up", ns=h.name)
            sh("ip", "link", "set", inner, "name", "eth0", ns=h.name)
            sh("ip", "addr", "add", f"{h.addr}/24", "dev", "eth0", ns=h.name)
            sh("ip", "link", "set", "eth0", "up", ns=h.name)
            sh("ip", "route", "add", "default", "via", self.gateway, ns=h.name)

    def _start_redis(self) -> None:
        self.redis = subprocess.Popen(
            ["redis-server", *private_server_args(self.redis_port, bind=self.gateway), "--save", "",
             "--appendonly", "no", "--protected-mode", "no", "--logfile", str(self.tmp / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError), redis.Redis.from_url(self.redis_url, socket_timeout=0.5) as r:
                if r.ping():
                    return
            time.sleep(0.05)
        raise RuntimeError("the hosts' Redis did not answer")

    def _start_engine(self, h: Host, image: Path) -> None:
        t0 = time.monotonic()
        h.start_dockerd()
        h.timings["dockerd"] = time.monotonic() - t0
        h.docker("load", "-q", "-i", str(image))
        # the cached tar carries the tag it was saved under (another run's, for the same image id)
        h.docker("tag", image.stem, self.image)
        h.timings["image_loaded"] = time.monotonic() - t0

    def manager_config(self, h: Host) -> dict[str, Any]:
        """A host's manager: manager_id = host name, node ports published on the host's address."""
        cfg: dict[str, Any] = {
            "manager_id": h.name,
            "log_format": "logfmt",
            "logger_level": "INFO",
            "docker_host": h.docker_host,
            "redis": {"url": self.redis_url, "key_prefix": "tsm", "socket_timeout_seconds": 1.0},
            "node": {"creation_wait_seconds": 20, "idle_grace_seconds": 0, "stop_timeout_seconds": 2,
                     "publish_host": h.addr, "advertise_host": h.addr,
                     "network": {"publish": True},
                     "disk": {"workspace_bytes": 0},
                     "creation_kwargs": {"image": self.image, "init": True, "mem_limit": "512m"}},
            "proxy": {"connect_timeout_seconds": 2.0},
            "checker": {"interval_seconds": 0.5, "lease_ttl_seconds": 3, "start_jitter_seconds": 0.2},
            "cluster": {"internal_token": self.internal_token, "node_secret_key": f"{self.internal_token}-nodes",
                        "heartbeat_seconds": 0.5, "replica_ttl_seconds": 2,
                        "fanout_timeout_seconds": 2, "max_nodes_per_manager": 40, "lost_after_seconds": 3},
            "admin": {"token": self.admin_token},
        }
        return deep_merge(cfg, json.loads(json.dumps(self.overrides)))

    # --- faults -------------------------------------------------------------------
    def host(self, name_or_index: str | int) -> Host:
        if isinstance(name_or_index, int):
            return self.hosts[name_or_index]
        return next(h for h in self.hosts if h.name == name_or_index)

    def restart_manager(self, h: Host) -> None:
        assert h.manager is not None
        h.manager.stop(5)
        h.manager.start()

    def crash(self, h: Host) -> None:
        """The host is gone at once: link down, manager SIGKILLed, containers and engine killed."""
        h.link(False)
        assert h.manager is not None
        h.manager.kill()
        h.kill_engine()

    def recover(self, h: Host) -> None:
        """A crashed host boots again: engine, link, manager."""
        h.start_dockerd()
        h.link(True)
        assert h.manager is not None
        h.manager.start()

    # --- teardown -----------------------------------------------------------------
    def logs(self) -> str:
        out = []
        for h in self.hosts:
            if h.manager is not None:
                out.append(f"----- manager {h.name} -----\n{h.manager.logs()[-5000:]}")
        return "\n".join(out)

    def close(self) -> None:
        """Remove everything: managers, containers by label, engines and their data, namespaces, bridge."""
        for h in self.hosts:
            if h.manager is not None:
                with contextlib.suppress(Exception):
                    h.manager.stop(5)
        import docker

        for h in self.hosts:
            with contextlib.suppress(Exception):
                h.link(True)
            if h.dockerd is not None and h.dockerd.poll() is None and h.engine_answers():
                with contextlib.suppress(Exception):
                    client = docker.DockerClient(base_url=h.docker_host, version="1.41", timeout=30)
                    remove_project_objects(client, h.name)
                    client.close()
            h.stop_dockerd()
            remove_tree(h.data_root)
            remove_tree(h.exec_root)
            Path(f"{h.exec_root}.pid").unlink(missing_ok=True)
            Path(h.sock).unlink(missing_ok=True)
            sh("ip", "netns", "del", h.name, check=False)
        if self.redis is not None:
            stop_process(self.redis, 5)
        sh("ip", "link", "del", self.bridge, check=False)
        while sh("iptables", "-D", *self._forward_rule, check=False).returncode == 0:
            pass
        self.marker.unlink(missing_ok=True)


class PrivateEngine(Hosts):
    """One host of its own for a test's faults: a dockerd in a network namespace (live-restore, its
    runtimes in a config file of its own) that tests stop, restart and reconfigure, never the
    machine's. Managers run on this machine (``start_manager(**engine.manager_overrides())``) and
    reach nodes at ports published on the host's address, as in DaemonSet mode."""

    def __init__(self, tmp: Path, image: str) -> None:
        super().__init__(tmp, image, n=1)
        self.config_path = tmp / "daemon.json"
        self.first_bridge: dict[str, Any] = {}  # its default bridge as its first start made it
        self.runtimes: dict[str, Any] = {}
        runsc = shutil.which("runsc")
        if runsc:  # Debian's runsc cannot build its own network stack here: --network=host (register-runsc.sh)
            self.runtimes["runsc"] = {"path": runsc, "runtimeArgs": ["--network=host"]}
        self._write_config()
        self.engine_host = self.hosts[0]  # its one host (Hosts.host(name) still finds it by name)
        self.engine_host.dockerd_args = ["--live-restore", "--config-file", str(self.config_path)]

    @property
    def docker_host(self) -> str:
        return self.engine_host.docker_host

    @property
    def addr(self) -> str:
        return self.engine_host.addr

    def start(self, managers: bool = False) -> PrivateEngine:
        super().start(managers=False)
        # its data root is new: this is a dockerd's first start, as on a new user's machine (the
        # default bridge's IPAM has no Gateway key until a restart; kept for the test that says so)
        self.first_bridge = json.loads(self.engine_host.docker("network", "inspect", "bridge").stdout)[0]
        return self

    def manager_overrides(self) -> dict[str, Any]:
        """start_manager keyword arguments for a manager driving this engine."""
        # the firewall goes where the engine's bridges are (its namespace), as for the chart's pods
        return {"docker_host": self.docker_host,
                "node": {"publish_host": self.addr, "advertise_host": self.addr,
                         "network": {"publish": True, "firewall_host_namespace": True}}}

    def client(self) -> Any:
        import docker

        return docker.DockerClient(base_url=self.docker_host, version="1.41", timeout=60)

    def _write_config(self) -> None:
        self.config_path.write_text(json.dumps({"runtimes": self.runtimes}))

    def set_runtime(self, name: str, spec: dict[str, Any] | None) -> None:
        """Register (spec) or forget (None) a runtime: its config file rewritten, SIGHUP to reload."""
        if spec is None:
            self.runtimes.pop(name, None)
        else:
            self.runtimes[name] = spec
        self._write_config()
        assert self.engine_host.dockerd is not None
        self.engine_host.dockerd.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            known = json.loads(self.engine_host.docker("info", "--format", "{{json .Runtimes}}").stdout)
            if (name in known) == (spec is not None):
                return
            time.sleep(0.1)
        raise RuntimeError(f"the private engine did not {'learn' if spec else 'forget'} runtime {name}")

    def stop_engine(self) -> None:
        """dockerd stopped gracefully; with live-restore its containers keep running."""
        self.engine_host.stop_dockerd(keep_containers=True)

    def start_engine(self) -> None:
        self.engine_host.start_dockerd()

    def ensure_running(self) -> None:
        if not self.engine_host.engine_answers():
            self.start_engine()

    @contextlib.contextmanager
    def listener(self, reach: str = "") -> Iterator[int]:
        """A TCP listener on every address of the engine's host (its namespace), which that host
        reaches itself at ``reach`` (default: its address); yields its port."""
        port = random.randint(20000, 30000)
        accept = (f"import socket\ns = socket.socket(); s.bind(('0.0.0.0', {port})); s.listen(16)\n"
                  "while True:\n    s.accept()[0].close()\n")
        proc = subprocess.Popen([*in_netns(self.engine_host.name), sys.executable, "-c", accept],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            check = f"import socket; socket.create_connection(('{reach or self.addr}', {port}), 1)"
            deadline = time.monotonic() + 10
            while sh(sys.executable, "-c", check, ns=self.engine_host.name, check=False).returncode != 0:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"the listener on {self.engine_host.name}:{port} did not answer")
                time.sleep(0.05)
            yield port
        finally:
            stop_process(proc, 5)

    def bridge_address(self, network: str) -> str:
        """The host's address on one of this engine's bridge networks, from the interface itself."""
        net = json.loads(self.engine_host.docker("network", "inspect", network).stdout)[0]
        dev = (net.get("Options") or {}).get("com.docker.network.bridge.name") or f"br-{net['Id'][:12]}"
        (link,) = json.loads(sh("ip", "-j", "-4", "addr", "show", "dev", dev, ns=self.engine_host.name).stdout)
        return str(link["addr_info"][0]["local"])


def sweep_stale() -> list[str]:
    """Remove what a run killed before its teardown left (namespaces, bridges, engines' data), for
    tags whose engines are all dead; a run in progress keeps its own. Returns the tags removed."""
    tags: dict[str, list[str]] = {}
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        m = re.fullmatch(r"host(\d+)-([0-9a-f]{4})", name)
        if m:
            tags.setdefault(m.group(2), []).append(m.group(1))
    for line in sh("ip", "-o", "link", "show", "type", "bridge", check=False).stdout.splitlines():
        m = re.search(r": tsmhbr([0-9a-f]{4}):", line)
        if m:
            tags.setdefault(m.group(1), [])
    removed = []
    for tag, indexes in tags.items():
        if _young(Path(f"/run/tsmh-{tag}.started")) or any(_alive(Path(f"/run/tsmh-{tag}-{i}.pid"))
                                                            for i in indexes):
            continue  # a run setting up (its engines not started yet), or one going on
        for i in indexes:
            for pid in _pids_naming(f"/run/tsmh-{tag}-{i}"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            remove_tree(STATE / f"tsmh-{tag}-{i}")
            remove_tree(Path(f"/run/tsmh-{tag}-{i}"))
            for leftover in (f"/run/tsmh-{tag}-{i}.pid", f"/run/tsmh-{tag}-{i}.sock"):
                Path(leftover).unlink(missing_ok=True)
            sh("ip", "netns", "del", f"host{i}-{tag}", check=False)
        sh("ip", "link", "del", f"tsmhbr{tag}", check=False)
        Path(f"/run/tsmh-{tag}.started").unlink(missing_ok=True)
        rule = ["FORWARD", "-i", f"tsmhbr{tag}", "-o", f"tsmhbr{tag}", "-j", "ACCEPT"]
        while sh("iptables", "-D", *rule, check=False).returncode == 0:
            pass
        removed.append(tag)
    return removed


def remove_tree(root: Path) -> None:
    """Unmount what an engine left mounted under root (a killed dockerd leaves its data root bound
    onto itself, and container layers), deepest first, then delete it."""
    prefix = str(root)
    points = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                points.append(point)
    for point in sorted(points, key=len, reverse=True):
        sh("umount", "-l", point, check=False)
    shutil.rmtree(root, ignore_errors=True)


def _young(path: Path, seconds: float = 120) -> bool:
    try:
        return time.time() - path.stat().st_mtime < seconds
    except OSError:
        return False


def _alive(pidfile: Path) -> bool:
    try:
        os.kill(int(pidfile.read_text().strip()), 0)
    except (OSError, ValueError):
        return False
    return True


def _pids_naming(path: str) -> list[int]:
    """Processes whose command line names path (itself, or a file beside or under it)."""
    pattern = re.compile(re.escape(path.encode()) + rb"[/.\x00]")
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):
                if pattern.search((p / "cmdline").read_bytes() + b"\x00"):
                    out.append(int(p.name))
    return out


def wait_http(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")
