"""A real Kubernetes v1.20.2 on the hosts of testing/hosts.py, for the chart's live tests.

scripts/kubernetes.sh builds the servers from Debian's source package (setup.sh --test). Here:
etcd, kube-apiserver, kube-controller-manager and kube-scheduler run in the root namespace on the
hosts' bridge address; each network-namespace host runs a kubelet driving that host's own dockerd
(dockershim) and a kube-proxy (iptables mode), so the cluster has two real nodes.

What a CNI plugin and CoreDNS would give a cluster is done by hand, as a host-gw network does it:
- each host's engine has its own pod subnet (dockerd --bip), and every host routes the other hosts'
  pod subnets to them, so pod IPs are unique and reachable across hosts;
- Service names resolve through dnsmasq on the bridge address (the kubelets' --cluster-dns), fed
  from the API's Services by a watcher thread here.
Each host's dockerd and kubelet share a mount namespace of their own, where /run/tsm-k8s holds that
host's engine socket (the path the chart's pods mount) and /var/log/pods is the host's own.

``KubeCluster.close`` removes it all; ``sweep_stale`` removes what a killed run left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import yaml

from testing.harness import free_port, stop_process
from testing.hosts import STATE, Host, Hosts, in_netns, remove_tree, sh

SOCKET_DIR = "/run/tsm-k8s"  # in each host's mount namespace: that host's engine socket
SOCKET = f"{SOCKET_DIR}/docker.sock"
LOG_DIRS = ("/var/log/pods", "/var/log/containers")  # kubelet's fixed paths, made per host
CLUSTER_DOMAIN = "cluster.local"
POD_SUPERNET = "10.240.0.0/13"  # pod subnets 10.24<i>.<n>.0/24: host i of the hosts' subnet 10.231.<n>


def build_dir() -> Path:
    """Where scripts/kubernetes.sh put the servers (bin/) and the pause binary (pause.tar)."""
    marker = STATE / "kubernetes-build"
    if not marker.exists():
        raise RuntimeError("no Kubernetes build: run `bash scripts/setup.sh --test` (scripts/kubernetes.sh)")
    path = Path(marker.read_text().strip())
    if not (path / ".done").exists():
        raise RuntimeError(f"the Kubernetes build in {path} is incomplete: run scripts/kubernetes.sh")
    return path


def redis_image() -> str:
    """The local image of Debian's redis-server that scripts/kubernetes.sh built."""
    return (STATE / "kubernetes-redis-image").read_text().strip()


class KubeCluster:
    """The control plane, one kubelet and kube-proxy per host, the pod network and DNS."""

    def __init__(self, hosts: Hosts, tmp: Path) -> None:
        self.hosts = hosts
        self.tmp = tmp
        self.build = build_dir()
        self.bin = self.build / "bin"
        self.tag = hosts.tag
        self.dir = STATE / f"tsmk-{self.tag}"  # certs, keys, kubeconfig, kubelet roots
        self.etcd_dir = Path(f"/dev/shm/tsmk-{self.tag}-etcd")  # memory: fsync is the apiserver's pace
        n = hosts.subnet.split(".")[2]
        self.service_cidr = f"10.239.{n}.0/24"
        self.pod_cidrs = {h.name: f"10.{240 + i}.{n}.0/24" for i, h in enumerate(hosts.hosts, 1)}
        self.gateway = hosts.gateway
        self.api_port = free_port()
        self.server = f"https://{self.gateway}:{self.api_port}"
        self.token = uuid.uuid4().hex
        self.pause_image = f"toolserver-k8s-pause:{self.build.name.split('-')[-1]}"
        self.kubeconfig = self.dir / "kubeconfig"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.timings: dict[str, float] = {}
        self._dns_stop = threading.Event()
        self._dns_thread: threading.Thread | None = None
        self._dns_hosts = self.dir / "dns-hosts"
        for _i, h in enumerate(hosts.hosts, 1):
            hd = self.host_dir(h)
            mounts = [str(hd / "run"), *(str(hd / Path(d).name) for d in LOG_DIRS)]
            # dockerd in a mount namespace of its own where the host's directories cover the shared paths
            script = " && ".join(f'mount --bind "${j + 1}" {target}'
                                 for j, target in enumerate([SOCKET_DIR, *LOG_DIRS]))
            h.dockerd_wrap = ["unshare", "--mount", "--propagation", "slave", "--", "sh", "-c",
                              f'{script} && shift {len(mounts)} && exec "$@"', "sh", *mounts]
            bip = self.pod_cidrs[h.name].replace(".0/24", ".1/24")
            h.dockerd_args = ["--host", f"unix://{SOCKET}", "--bip", bip]

    def host_dir(self, h: Host) -> Path:
        return self.dir / h.name

    # --- set-up -----------------------------------------------------------------------------
    def start(self) -> KubeCluster:
        """Engines first (hosts.start), then the control plane, then a kubelet and kube-proxy per host."""
        t0 = time.monotonic()
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "owner").write_text(str(os.getpid()))  # a run whose owner is gone is swept
        for d in (SOCKET_DIR, *LOG_DIRS):
            Path(d).mkdir(parents=True, exist_ok=True)  # mount points of the hosts' own directories
        for h in self.hosts.hosts:
            for sub in ("run", *(Path(d).name for d in LOG_DIRS), "kubelet", "dockershim"):
                (self.host_dir(h) / sub).mkdir(parents=True, exist_ok=True)
        self.hosts.start(managers=False)
        self.timings["engines"] = time.monotonic() - t0
        try:
            self._pod_network()
            self._control_plane()
            self.timings["control_plane"] = time.monotonic() - t0
            for h in self.hosts.hosts:
                self.load_image(h, self.pause_image, tar=self.build / "pause.tar")
                self.start_node(h)
            self._wait_nodes_ready(120)
            self.timings["nodes_ready"] = time.monotonic() - t0
        except BaseException:
            self.close()
            raise
        return self

    def _pod_network(self) -> None:
        """Routes between the hosts' pod subnets (host-gw) and the forward rule into each engine's bridge."""
        for h in self.hosts.hosts:
            for other in self.hosts.hosts:
                if other is not h:
                    sh("ip", "route", "add", self.pod_cidrs[other.name], "via", other.addr, ns=h.name)
            self.pod_forward(h)
        # the test itself reaches pods too (readiness and placement checks at the pod's own address)
        for h in self.hosts.hosts:
            sh("ip", "route", "replace", self.pod_cidrs[h.name], "via", h.addr)

    def pod_forward(self, h: Host) -> None:
        """dockerd drops new connections into its bridge unless a port is published: let pod traffic in."""
        rule = ["FORWARD", "-d", self.pod_cidrs[h.name], "-o", "docker0", "-j", "ACCEPT"]
        if sh("iptables", "-C", *rule, check=False, ns=h.name).returncode != 0:
            sh("iptables", "-I", *rule, ns=h.name)

    def _control_plane(self) -> None:
        d = self.dir
        sh("openssl", "genrsa", "-out", str(d / "sa.key"), "2048")
        (d / "tokens.csv").write_text(f"{self.token},admin,admin,system:masters\n")
        self.kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "tsmk",
            "clusters": [{"name": "tsmk", "cluster": {"server": self.server, "insecure-skip-tls-verify": True}}],
            "users": [{"name": "admin", "user": {"token": self.token}}],
            "contexts": [{"name": "tsmk", "context": {"cluster": "tsmk", "user": "admin"}}],
        }))
        os.chmod(self.kubeconfig, 0o600)
        etcd_port, peer_port = free_port(), free_port()
        self.etcd_dir.mkdir(parents=True, exist_ok=True)
        self._spawn("etcd", ["etcd", "--name", "tsmk", "--data-dir", str(self.etcd_dir),
                             "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
                             "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
                             "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
                             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
                             "--initial-cluster", f"tsmk=http://127.0.0.1:{peer_port}"])
        self._spawn("kube-apiserver", [
            str(self.bin / "kube-apiserver"), f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            f"--bind-address={self.gateway}", f"--advertise-address={self.gateway}",
            f"--secure-port={self.api_port}", f"--cert-dir={d / 'certs'}",
            f"--token-auth-file={d / 'tokens.csv'}", "--authorization-mode=AlwaysAllow",
            f"--service-account-key-file={d / 'sa.key'}", f"--service-account-signing-key-file={d / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-cluster-ip-range={self.service_cidr}", "--allow-privileged=true",
            "--profiling=false", "--enable-priority-and-fairness=false"])
        self._wait(lambda: self.api_ok("/readyz"), 60, "kube-apiserver /readyz")
        common = [f"--kubeconfig={self.kubeconfig}", "--leader-elect=false", "--port=0", "--secure-port=0",
                  "--profiling=false"]
        self._spawn("kube-controller-manager", [
            str(self.bin / "kube-controller-manager"), *common,
            f"--service-account-private-key-file={d / 'sa.key'}", f"--root-ca-file={d / 'certs' / 'apiserver.crt'}",
            # a host that stops reporting is noticed in seconds, not the default 40 s
            "--node-monitor-period=1s", "--node-monitor-grace-period=10s"])
        self._spawn("kube-scheduler", [str(self.bin / "kube-scheduler"), *common])

    def start_node(self, h: Host) -> None:
        """The host's kubelet (in its engine's mount namespace) and kube-proxy (in its network namespace)."""
        assert h.dockerd is not None
        hd = self.host_dir(h)
        mnt = ["nsenter", f"--mount=/proc/{h.dockerd.pid}/ns/mnt", f"--net=/run/netns/{h.name}", "--"]
        (hd / "kubelet.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            # the node's status every 2 s: a crashed host is NotReady 10 s later (controller-manager's grace)
            "nodeStatusUpdateFrequency": "2s", "nodeLeaseDurationSeconds": 8,
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "clusterDNS": [self.gateway], "clusterDomain": CLUSTER_DOMAIN,
        }))
        run = f"unix://{hd / 'run' / 'dockershim.sock'}"
        self._spawn(f"kubelet-{h.name}", [
            *mnt, str(self.bin / "kubelet"), f"--config={hd / 'kubelet.yaml'}", f"--kubeconfig={self.kubeconfig}",
            f"--hostname-override={h.name}", f"--node-ip={h.addr}",
            "--container-runtime=docker", f"--docker-endpoint={h.docker_host}",
            f"--container-runtime-endpoint={run}", f"--image-service-endpoint={run}",
            f"--experimental-dockershim-root-directory={hd / 'dockershim'}",
            f"--pod-infra-container-image={self.pause_image}", f"--root-dir={hd / 'kubelet'}",
            f"--cert-dir={hd / 'kubelet' / 'pki'}",
            "--cgroups-per-qos=false", "--enforce-node-allocatable=", "--cgroup-driver=cgroupfs",
            "--fail-swap-on=false", "--oom-score-adj=0", "--eviction-hard=", "--image-gc-high-threshold=100",
            "--image-gc-low-threshold=99", "--make-iptables-util-chains=false", "--protect-kernel-defaults=false",
            "--read-only-port=0", "--healthz-port=0", "--v=1"])
        self._spawn(f"kube-proxy-{h.name}", [
            *in_netns(h.name), str(self.bin / "kube-proxy"), f"--kubeconfig={self.kubeconfig}",
            f"--hostname-override={h.name}", f"--cluster-cidr={POD_SUPERNET}", "--proxy-mode=iptables",
            "--oom-score-adj=0", "--conntrack-max-per-core=0", "--conntrack-tcp-timeout-established=0",
            "--conntrack-tcp-timeout-close-wait=0", "--metrics-bind-address=127.0.0.1:10249",
            "--healthz-bind-address=127.0.0.1:10256", "--profiling=false"])

    def stop_node(self, h: Host, kill: bool = False) -> None:
        """Stop (or, for a crash, SIGKILL) the host's kubelet and kube-proxy."""
        for name in (f"kubelet-{h.name}", f"kube-proxy-{h.name}"):
            p = self.procs.pop(name, None)
            if p is None:
                continue
            if kill:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
            else:
                stop_process(p, 10)

    def crash(self, h: Host) -> None:
        """The host is gone at once: link cut, kubelet and kube-proxy killed, containers and engine killed."""
        h.link(False)
        self.stop_node(h, kill=True)
        h.kill_engine()

    def recover(self, h: Host) -> None:
        """The crashed host boots again: its engine, link, pod network rule, kubelet and kube-proxy."""
        h.start_dockerd()
        h.link(True)
        self.pod_forward(h)
        self.start_node(h)

    def _wait_nodes_ready(self, timeout: float) -> None:
        names = {h.name for h in self.hosts.hosts}
        self._wait(lambda: names <= self.ready_nodes(), timeout, f"nodes {sorted(names)} Ready")

    def ready_nodes(self) -> set[str]:
        items = self.api("GET", "/api/v1/nodes").json()["items"]
        return {n["metadata"]["name"] for n in items
                if any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions", []))}

    def load_image(self, h: Host, image: str, tar: Path | None = None) -> None:
        """An image of the machine's engine (or the pause binary's tar) into a host's engine under the same tag."""
        if tar is not None:
            h.docker("import", "--change", 'ENTRYPOINT ["/pause"]', str(tar), image)
            return
        save = subprocess.Popen(["/usr/bin/docker", "save", image], stdout=subprocess.PIPE)
        load = subprocess.run(["/usr/bin/docker", "-H", h.docker_host, "load", "-q"], stdin=save.stdout,
                              capture_output=True, text=True, timeout=300)
        assert save.stdout is not None
        save.stdout.close()
        if save.wait(60) != 0 or load.returncode != 0:
            raise RuntimeError(f"docker save {image} | docker load on {h.name} failed: {load.stderr[-500:]}")

    # --- DNS ----------------------------------------------------------------------------------
    def start_dns(self) -> None:
        """dnsmasq on the bridge address answering <service>.<namespace>.svc.cluster.local, the rest upstream."""
        self._dns_hosts.write_text("")
        self._spawn("dnsmasq", ["dnsmasq", "--keep-in-foreground", "--user=root", "--port=53",
                                f"--listen-address={self.gateway}", "--bind-interfaces", "--no-hosts",
                                f"--addn-hosts={self._dns_hosts}", "--pid-file=", "--log-facility=-"])
        self._dns_thread = threading.Thread(target=self._feed_dns, daemon=True)
        self._dns_thread.start()

    def _feed_dns(self) -> None:
        """What CoreDNS's kubernetes plugin does, by polling: every Service's ClusterIP under its name."""
        last = ""
        while not self._dns_stop.wait(0.5):
            with contextlib.suppress(Exception):
                lines = []
                for s in self.api("GET", "/api/v1/services").json()["items"]:
                    ip = s["spec"].get("clusterIP")
                    if ip and ip != "None":
                        m = s["metadata"]
                        lines.append(f"{ip} {m['name']}.{m['namespace']}.svc.{CLUSTER_DOMAIN}")
                text = "\n".join(sorted(lines)) + "\n"
                if text != last:
                    self._dns_hosts.write_text(text)
                    self.procs["dnsmasq"].send_signal(signal.SIGHUP)  # re-reads --addn-hosts
                    last = text

    # --- API ------------------------------------------------------------------------------------
    def api(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """A call to the API server as the cluster's admin."""
        return httpx.request(method, self.server + path, headers={"authorization": f"Bearer {self.token}"},
                             verify=False, timeout=kw.pop("timeout", 10), **kw)

    def api_ok(self, path: str) -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return self.api("GET", path, timeout=2).status_code == 200
        return False

    def pods(self, namespace: str, selector: str = "") -> list[dict[str, Any]]:
        r = self.api("GET", f"/api/v1/namespaces/{namespace}/pods", params={"labelSelector": selector})
        r.raise_for_status()
        return list(r.json()["items"])

    # --- plumbing ---------------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - kept open by the process
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def _wait(self, pred: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead} exited while waiting for {what}:\n{self.logs(dead)}")
            time.sleep(0.2)
        raise RuntimeError(f"timed out waiting for {what}:\n{self.logs()}")

    def logs(self, names: list[str] | None = None, tail: int = 3000) -> str:
        out = []
        for name in names or list(self.procs):
            path = self.tmp / f"{name}.log"
            if path.exists():
                out.append(f"----- {name} -----\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    def close(self) -> None:
        """Pods' containers go with the engines; kubelets, kube-proxies, control plane, DNS, then the hosts."""
        self._dns_stop.set()
        for h in self.hosts.hosts:
            self.stop_node(h)
        for name in ("kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd", "dnsmasq"):
            p = self.procs.pop(name, None)
            if p is not None:
                stop_process(p, 10)
        for p in self.procs.values():
            stop_process(p, 5)
        self.procs.clear()
        self.hosts.close()
        remove_tree(self.dir)
        remove_tree(self.etcd_dir)


def sweep_stale() -> list[str]:
    """Remove what a killed run left: its kubelets, kube-proxies, control plane, DNS and engines
    (they run in sessions of their own and outlive a killed test process), then what the hosts
    fixture's sweep removes (namespaces, bridge, engines' data). A run whose test process lives is
    kept. Returns the tags removed."""
    from testing.hosts import sweep_stale as sweep_hosts

    removed = []
    for root in STATE.glob("tsmk-*"):
        tag = root.name.split("-")[1]
        try:
            owner = int((root / "owner").read_text())
            os.kill(owner, 0)
            continue  # its test process is alive: a run going on
        except (OSError, ValueError):
            pass
        for path in (str(root), f"/dev/shm/tsmk-{tag}-etcd", *(f"/run/tsmh-{tag}-{i}" for i in range(1, 10))):
            for pid in _pids_naming(path):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for pidfile in Path("/run").glob(f"tsmh-{tag}-*.pid"):
            pidfile.unlink(missing_ok=True)  # its engine was killed above (a zombie would still look alive)
        remove_tree(root)
        remove_tree(Path(f"/dev/shm/tsmk-{tag}-etcd"))
        removed.append(tag)
    sweep_hosts()  # the engines named above are dead now: their namespaces and data go
    return removed


def _pids_naming(path: str) -> list[int]:
    mark = path.encode()
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):
                if mark in (p / "cmdline").read_bytes():
                    out.append(int(p.name))
    return out
