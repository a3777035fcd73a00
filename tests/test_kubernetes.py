"""The chart on a real Kubernetes (v1.20.2 built by scripts/kubernetes.sh; testing/kube.py): an API
server, a controller-manager, a scheduler and two kubelets, each kubelet on a network-namespace host
with its own Docker engine. Everything goes through `helm install/upgrade/uninstall` with values a
user would pass, and clients reach the managers through the chart's Service as a NodePort on the
hosts' addresses (kube-proxy in iptables mode on each host balances it over the pods).

What is not run here, and why, is said by the tests themselves: privileged pods cannot start on this
machine (its containers lack CAP_SYS_RESOURCE), so hostIsolation and Docker-in-Docker are not installed.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import docker
import httpx
import pytest
import yaml

from testing.harness import report
from testing.hosts import STATE, Host, Hosts
from testing.kube import SOCKET, KubeCluster, redis_image, sweep_stale
from testing.manager_image import manager_image
from tests.conftest import NODE_IMAGE, ROOT, wait_for

CHART = ROOT / "helm" / "toolserver-manager"
LABEL = "toolserver-manager.manager_id"
MANAGER_IMAGE = "toolserver-manager:k8s-test"
DS, DEP = "tsm-ds", "tsm-dep"  # releases (and their namespaces)
# the module's first test also pays for the cluster's start and the images (about 2 min)
pytestmark = pytest.mark.timeout(600)


class Live:
    """The cluster, helm pointed at it, and what the tests share."""

    def __init__(self, kube: KubeCluster, helm: str, tmp: Path) -> None:
        self.kube = kube
        self.hosts = kube.hosts
        self.helm_bin = helm
        self.tmp = tmp
        self.tag = kube.tag
        self.image_tag = f"k8s-{self.tag}"
        self.privileged: str = ""  # why privileged pods cannot run here ("" when they can)

    @property
    def h1(self) -> Host:
        return self.hosts.hosts[0]

    @property
    def h2(self) -> Host:
        return self.hosts.hosts[1]

    def helm(self, *args: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "KUBECONFIG": str(self.kube.kubeconfig), "HELM_CACHE_HOME": str(self.tmp / "helm"),
               "HELM_CONFIG_HOME": str(self.tmp / "helm"), "HELM_DATA_HOME": str(self.tmp / "helm")}
        proc = subprocess.run([self.helm_bin, *args], capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            ns = args[args.index("-n") + 1] if "-n" in args else "default"
            raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stderr}\n{self.diagnose(ns)}\n"
                                 f"{self.kube.logs(tail=1500)}")
        return proc

    def values(self, name: str, extra: dict[str, Any]) -> Path:
        """A values file as a user writes one for this cluster: images, Redis, how clients come in."""
        base: dict[str, Any] = {
            "image": {"repository": MANAGER_IMAGE.split(":")[0], "tag": self.image_tag},
            "service": {"type": "NodePort"},
            # the hosts' engines listen there (each in its own mount namespace); not /var/run/docker.sock,
            # which on this machine is the one engine every test shares
            "docker": {"hostSocket": {"path": SOCKET}},
            "config": {"engine": {"docker": {"creation_kwargs": {"image": NODE_IMAGE}}}, "node": {"image_pull": "never"},
                       "cluster": {"lost_after_seconds": 10}},
            # a new pod is Ready within a second of answering /ready, not up to the default 5 s
            # later (each install and rolled pod waits on it); a NotReady verdict takes 10 s as by default
            "readinessProbe": {"initialDelaySeconds": 1, "periodSeconds": 1, "failureThreshold": 10},
        }
        if self.privileged:
            # no privileged pod runs here: no loop-device workspaces, no host firewall (see test_privileged_modes)
            base["hostIsolation"] = {"enabled": False}
            base["config"]["node"]["disk"] = {"workspace_bytes": 0}
        path = self.tmp / f"{name}-values.yaml"
        path.write_text(yaml.safe_dump(deep(base, extra)))
        return path

    def secret(self, ns: str, release: str, key: str) -> str:
        r = self.kube.api("GET", f"/api/v1/namespaces/{ns}/secrets/{release}-toolserver-manager")
        return base64.b64decode(r.json()["data"][key]).decode()

    def node_port(self, ns: str, release: str) -> int:
        svc = self.kube.api("GET", f"/api/v1/namespaces/{ns}/services/{release}-toolserver-manager").json()
        return int(next(p["nodePort"] for p in svc["spec"]["ports"] if p["name"] == "http"))

    def manager_pods(self, ns: str) -> list[dict[str, Any]]:
        return self.kube.pods(ns, "app.kubernetes.io/name=toolserver-manager")

    def wait_pods_ready(self, ns: str, n: int, timeout: float = 120, exclude: set[str] = frozenset()) -> None:
        """Until n manager pods (none of the uids excluded) are Ready; on timeout, what they say."""
        def done() -> bool:
            ps = [p for p in self.manager_pods(ns) if not p["metadata"].get("deletionTimestamp")]
            return len(ps) == n and all(ready(p) for p in ps) and not exclude & {p["metadata"]["uid"] for p in ps}
        try:
            wait_for(done, timeout=timeout, interval=0.5, what=f"{n} manager pods Ready in {ns}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.diagnose(ns)}") from None

    def diagnose(self, ns: str) -> str:
        """Pods' phases, conditions and events, the last lines of each host's pod containers, and the
        kubelet's log of a host whose pod is not Ready (a pod stuck in ContainerCreating has no container
        to read: why it is stuck is only in its events and its kubelet's log)."""
        out = []
        stuck: set[str] = set()
        for p in self.kube.pods(ns):
            st = p["status"]
            if not ready(p) and p["spec"].get("nodeName"):
                stuck.add(p["spec"]["nodeName"])
            out.append(f"pod {p['metadata']['name']} on {p['spec'].get('nodeName')}: {st.get('phase')} "
                       f"{[(c['type'], c['status'], c.get('message', '')) for c in st.get('conditions', [])]} "
                       f"{[(c.get('state'), c.get('lastState'), c.get('restartCount')) for c in st.get('containerStatuses', [])]}")
        try:
            events = self.kube.api("GET", f"/api/v1/namespaces/{ns}/events").json().get("items", [])
        except (httpx.HTTPError, ValueError) as exc:  # the diagnosis must not hide what it diagnoses
            events = []
            out.append(f"events of {ns} not read: {exc!r}")
        for e in sorted(events, key=lambda e: e.get("lastTimestamp") or "")[-40:]:
            out.append(f"event {e.get('lastTimestamp')} {e.get('involvedObject', {}).get('name')} {e.get('reason')} "
                       f"x{e.get('count')}: {(e.get('message') or '')[:300]}")
        if stuck:
            out.append(self.kube.logs([f"kubelet-{name}" for name in sorted(stuck)], tail=6000))
        for h in self.hosts.hosts:
            ps = h.docker("ps", "-a", "--filter", "name=k8s_", "--format", "{{.Names}}", check=False)
            if ps.returncode != 0 or h.name in stuck:
                # an engine that does not answer leaves no container to read: its own log says why
                alive = h.dockerd is not None and h.dockerd.poll() is None
                out.append(f"----- {h.name}: docker ps exit {ps.returncode} {ps.stderr[-500:]}; its dockerd "
                           f"{'running' if alive else 'gone'}; its log:\n{h.log.read_text(errors='replace')[-4000:]}")
            for name in ps.stdout.split():
                if "POD" not in name:
                    logs = h.docker("logs", "--tail", "60", name, check=False)
                    out.append(f"----- {h.name} {name}\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}")
        return "\n".join(out)


def out(text: str) -> None:
    """Figures and tables for the run's summary (pytest captures a test's own output)."""
    for line in text.strip("\n").splitlines():
        report(line)


def deep(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = deep(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


def containers(h: Host) -> dict[str, str]:
    """id -> state of the project's node containers on a host's engine (pods' containers are not labelled)."""
    out = h.docker("ps", "-a", "--no-trunc", "--filter", f"label={LABEL}", "--format", "{{.ID}} {{.State}}").stdout
    return dict(line.split(" ", 1) for line in out.splitlines() if line.strip())


def owners(h: Host) -> set[str]:
    out = h.docker("ps", "-a", "--filter", f"label={LABEL}", "--format", f'{{{{.Label "{LABEL}"}}}}').stdout
    return set(out.split())


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, docker_client: docker.DockerClient) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("kube")
    t0 = time.monotonic()
    sweep_stale()
    helm = subprocess.run(["bash", str(ROOT / "scripts/install-helm.sh")], capture_output=True, text=True,
                          check=True).stdout.strip().splitlines()[-1]
    with manager_image(docker_client, MANAGER_IMAGE):  # built only if its sources changed
        t_image = time.monotonic() - t0
        kube = KubeCluster(Hosts(tmp, NODE_IMAGE), tmp)
        try:
            kube.start()
            kube.start_dns()
            lv = Live(kube, helm, tmp)

            def load(h: Host) -> None:  # what no registry can give the pods, under this run's tags
                kube.load_image(h, MANAGER_IMAGE)
                h.docker("tag", MANAGER_IMAGE, f"{MANAGER_IMAGE.split(':')[0]}:{lv.image_tag}")
                kube.load_image(h, redis_image())

            with ThreadPoolExecutor(len(kube.hosts.hosts)) as pool:  # each host's engine loads its own
                list(pool.map(load, kube.hosts.hosts))
            # as the chart runs the manager with hostIsolation: privileged, as root
            probe = lv.h1.docker("run", "--rm", "--privileged", "--user", "0", "--label", f"{LABEL}=k8s-probe",
                                 NODE_IMAGE, "true", check=False)
            if probe.returncode != 0:
                lv.privileged = probe.stderr.strip().splitlines()[0] if probe.stderr.strip() else "refused"
            out(f"\ncluster set-up: manager image {t_image:.1f} s, then "
                             f"{ {k: round(v, 1) for k, v in kube.timings.items()} } s; "
                             f"images loaded at {time.monotonic() - t0:.1f} s\n")
            yield lv
        except BaseException:
            sys.stderr.write(kube.logs())  # a failed set-up: what the servers said
            raise
        finally:
            kube.close()


# --- DaemonSet mode --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def daemonset(live: Live) -> Iterator[dict[str, Any]]:
    """The chart installed in daemonset mode against the hosts' Redis: one manager per kubelet host."""
    # the Redis URL without its password, which goes into the chart's Secret (never the ConfigMap)
    url = urlsplit(live.hosts.redis_url)
    values = live.values(DS, {"mode": "daemonset", "redis": {"mode": "external"},
                              "secrets": {"redisPassword": url.password},
                              "config": {"redis": {"url": f"redis://{url.hostname}:{url.port}{url.path}",
                                                   "key_prefix": f"k8s{live.tag}"}}})
    t0 = time.monotonic()
    notes = live.helm("install", DS, str(CHART), "-n", DS, "--create-namespace", "-f", str(values),
                    "--wait", "--timeout", "3m").stdout
    # helm's --wait counts a DaemonSet done with maxUnavailable pods not Ready yet: wait for all
    live.wait_pods_ready(DS, 2)
    state: dict[str, Any] = {"notes": notes, "values": values, "install_seconds": time.monotonic() - t0,
                             "admin": live.secret(DS, DS, "admin-token"),
                             "internal": live.secret(DS, DS, "internal-token"),
                             "port": live.node_port(DS, DS), "sessions": {}}
    yield state
    # what the tests did not uninstall themselves
    subprocess.run([live.helm_bin, "uninstall", DS, "-n", DS], capture_output=True,
                   env={**os.environ, "KUBECONFIG": str(live.kube.kubeconfig)}, timeout=120)


def service_url(live: Live, st: dict[str, Any], host: Host) -> str:
    """The chart's Service, as a NodePort on a host's address."""
    return f"http://{host.addr}:{st['port']}"


def pod_url(pod: dict[str, Any]) -> str:
    return f"http://{pod['status']['podIP']}:8080"


def pod_on(live: Live, ns: str, host: Host) -> dict[str, Any]:
    (pod,) = [p for p in live.manager_pods(ns) if p["spec"].get("nodeName") == host.name
              and not p["metadata"].get("deletionTimestamp")]
    return pod


def new_session(url: str) -> tuple[str, httpx.Client]:
    cl = httpx.Client(base_url=url, timeout=60)
    r = cl.post("/get_cookie")
    assert r.status_code == 200, r.text
    return cl.cookies["node_id"], cl


def call(url: str, node_id: str, path: str = "/get_available_tools", timeout: float = 30,
         **kw: Any) -> httpx.Response:
    """One call on a fresh connection (kube-proxy picks a pod per connection)."""
    return httpx.post(url + path, cookies={"node_id": node_id}, timeout=timeout, **kw)


def served(url: str, node_id: str, timeout: float = 30) -> httpx.Response:
    """A call through the Service once it accepts a connection: a refused connect is retried for a
    while, since kube-proxy may still be syncing a replaced pod's endpoint (seen under load after an
    upgrade and a reinstall); what the call answers is the caller's to judge."""
    def attempt() -> httpx.Response | None:
        try:
            return call(url, node_id, timeout=timeout)
        except httpx.ConnectError:
            return None
    return wait_for(attempt, timeout=30, interval=0.5, what=f"the Service at {url} accepting a connection")


def answered(url: str, node_id: str) -> bool:
    """Whether the session answers through the Service (the loop of calls during a change is what
    counts failures; this asks only whether the session is still there)."""
    return bool(served(url, node_id).status_code == 200)


def session_on(live: Live, st: dict[str, Any], host: Host) -> str:
    """A session whose node is on this host: made by the host's own pod (what placement does when it
    sends one there)."""
    r = httpx.post(pod_url(pod_on(live, DS, host)) + "/internal/nodes", json={},
                   headers={"x-tsm-internal-token": st["internal"]}, timeout=60)
    assert r.status_code == 200 and r.json()["manager_id"] == host.name, r.text
    return str(r.json()["id"])


def admin(url: str, st: dict[str, Any], path: str) -> Any:
    r = httpx.get(url + path, headers={"authorization": f"Bearer {st['admin']}"}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def test_daemonset_pods_ready_on_both_hosts_driving_their_engines(live: Live, daemonset: dict[str, Any]) -> None:
    pods = live.manager_pods(DS)
    assert sorted(p["spec"]["nodeName"] for p in pods) == sorted(h.name for h in live.hosts.hosts), pods
    assert all(ready(p) for p in pods)  # by the chart's own readiness probe (GET /ready), which --wait awaited
    # the PodDisruptionBudget's API is the one this 1.20 server serves
    pdbs = live.kube.api("GET", f"/apis/policy/v1beta1/namespaces/{DS}/poddisruptionbudgets").json()["items"]
    assert [p["metadata"]["name"] for p in pdbs] == [f"{DS}-toolserver-manager"]
    assert live.kube.api("GET", "/apis/policy/v1").status_code == 404
    for h in live.hosts.hosts:
        pod = pod_on(live, DS, h)
        body = httpx.get(pod_url(pod) + "/ready", timeout=10).json()
        assert body["status"] == "ready" and body["engine"] == "ok", body
        # without host privileges the manager takes the socket's group, whatever its GID on the host
        # (docker.hostSocket.group: auto), and runs as uid 10001 with no capability, not as root
        (name,) = h.docker("ps", "-q", "--filter", f"name=k8s_manager_{pod['metadata']['name']}_").stdout.split()
        proc = h.docker("exec", name, "cat", "/proc/1/status").stdout
        fields = dict(line.split(":", 1) for line in proc.splitlines() if ":" in line)
        assert fields["Uid"].split()[:2] == ["10001", "10001"] and fields["Gid"].split()[:2] == ["10001", "10001"]
        assert fields["Groups"].split() == [str(os.stat(h.sock).st_gid)], proc
        assert int(fields["CapEff"], 16) == 0 and int(fields["CapPrm"], 16) == 0, proc
    out(f"\nhelm install (daemonset) --wait: {daemonset['install_seconds']:.1f} s\n")


def test_sessions_spread_over_both_hosts_through_the_service(live: Live, daemonset: dict[str, Any]) -> None:
    st = daemonset
    ids = []
    for i in range(6):
        node_id, _ = new_session(service_url(live, st, live.hosts.hosts[i % 2]))
        ids.append(node_id)
    st["sessions"]["spread"] = ids
    rows = admin(service_url(live, st, live.h1), st, "/admin/nodes?limit=1000")["nodes"]
    where = {r["id"]: r["manager_id"] for r in rows if r["id"] in ids}
    per_host = {h.name: sum(1 for m in where.values() if m == h.name) for h in live.hosts.hosts}
    assert per_host == {live.h1.name: 3, live.h2.name: 3}, per_host  # spread: the fewest nodes first
    # each host's pod drives its own engine: its nodes are there, and only its own
    for h in live.hosts.hosts:
        assert owners(h) == {h.name}, owners(h)
        assert len(containers(h)) == 3
    # a session's calls work whichever host's pod answers: each pod directly, then the Service
    pods = {h.name: pod_on(live, DS, h) for h in live.hosts.hosts}
    for node_id in ids:
        for pod in pods.values():
            r = call(pod_url(pod), node_id)
            assert r.status_code == 200, r.text
            assert r.headers["x-tsm-replica"].startswith(pod["metadata"]["name"]), r.headers
    answered: dict[str, set[str]] = {}
    pod_names = [p["metadata"]["name"] for p in pods.values()]
    for node_id in ids:
        for k in range(8):
            r = call(service_url(live, st, live.hosts.hosts[k % 2]), node_id)
            assert r.status_code == 200, r.text
            answered.setdefault(node_id, set()).add(
                next(n for n in pod_names if r.headers["x-tsm-replica"].startswith(n)))
    out(f"\nsessions per host: {per_host}; pods answering each session through the Service "
                     f"(8 calls): {sorted(len(v) for v in answered.values())}\n")
    assert any(len(v) == 2 for v in answered.values()), answered


def test_upgrade_rolls_every_pod_with_no_failed_call(live: Live, daemonset: dict[str, Any]) -> None:
    st = daemonset
    ids = st["sessions"]["spread"]
    before = {p["metadata"]["uid"] for p in live.manager_pods(DS)}
    counts = {"ok": 0, "failed": 0}
    failures: list[str] = []
    stop = threading.Event()

    def loop(k: int) -> None:
        i = k
        while not stop.is_set():
            node_id = ids[i % len(ids)]
            url = service_url(live, st, live.hosts.hosts[i % 2])
            i += 1
            try:
                r = call(url, node_id, timeout=30)
                ok = r.status_code == 200
                detail = f"{r.status_code} {r.text[:120]}"
            except httpx.HTTPError as exc:
                ok, detail = False, repr(exc)
            counts["ok" if ok else "failed"] += 1
            if not ok:
                failures.append(f"{url} {node_id}: {detail}")
            # paced: some 80 calls a second in all see every moment of the roll, and leave the
            # kubelets and engines rolling the pods their share of the 2 cores
            stop.wait(0.05)

    threads = [threading.Thread(target=loop, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    try:
        # a changed config: the ConfigMap's checksum changes the pod template, so every pod is replaced
        live.helm("upgrade", DS, str(CHART), "-n", DS, "-f", str(st["values"]),
                  "--set", "config.logger_level=DEBUG", "--wait", "--timeout", "3m")
        live.wait_pods_ready(DS, 2, exclude=before)
        # calls go on a while on the new pods only: the last one replaced serves too
        seen = counts["ok"] + counts["failed"]
        wait_for(lambda: counts["ok"] + counts["failed"] >= seen + 40, timeout=60, what="40 more calls")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    took = time.monotonic() - t0
    kept = [nid for nid in ids if answered(service_url(live, st, live.h1), nid)]
    out(f"\nhelm upgrade (daemonset, 2 pods rolled in {took:.1f} s): {counts['ok'] + counts['failed']} "
                     f"calls, {counts['failed']} failed; sessions kept {len(kept)}/{len(ids)}\n")
    assert counts["failed"] == 0, failures[:10]
    assert counts["ok"] > 50
    assert kept == ids
    assert sum(len(containers(h)) for h in live.hosts.hosts) == len(ids)


def test_a_kubelet_host_that_crashes(live: Live, daemonset: dict[str, Any]) -> None:
    st = daemonset
    h1, h2 = live.h1, live.h2
    # this test's own starting point, whatever the one before left (a failed upgrade failed that test,
    # not this one too)
    live.wait_pods_ready(DS, 2)
    rel_id, keep_id, one_id = session_on(live, st, h2), session_on(live, st, h2), session_on(live, st, h1)
    p1 = pod_url(pod_on(live, DS, h1))
    assert call(p1, keep_id, "/upload_file", files={"file": ("keep.txt", b"kept")}).status_code == 200
    rel_cid = next(r["container_id"] for r in admin(p1, st, "/admin/nodes?limit=1000")["nodes"] if r["id"] == rel_id)
    pod2 = pod_on(live, DS, h2)["metadata"]["name"]
    rows: list[tuple[str, str, str, float]] = []

    def timed(what: str, fn: Any) -> httpx.Response:
        t = time.monotonic()
        r = fn()
        took = time.monotonic() - t
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text
        saw = body.get("detail", body) if isinstance(body, dict) else body
        rows.append((what, f"{r.status_code} {str(saw)[:60]}", "", took))
        return r

    live.kube.crash(h2)
    t_crash = time.monotonic()
    # the other host's pod keeps serving its sessions at once
    r = timed("call, session on host1, host1's pod", lambda: call(p1, one_id))
    assert r.status_code == 200, r.text
    # calls to the lost host's sessions fail fast with the 503 naming the host
    r = timed("call, session on host2 (first)", lambda: call(p1, keep_id))
    assert r.status_code in (502, 503) and h2.addr in r.json()["detail"], r.text
    later = [timed("call, session on host2 (later)", lambda: call(p1, keep_id)) for _ in range(5)]
    assert all(x.status_code == 503 and x.json()["detail"].startswith(f"host {h2.addr} is unreachable")
               for x in later), [x.text for x in later]
    # fail fast: no connect timeout (5 s) paid once the host is known lost; 0.02-0.7 s seen here
    assert max(row[3] for row in rows[-5:]) < 4.0, rows
    r = timed("release_session, session on host2", lambda: call(p1, rel_id, "/release_session"))
    assert r.status_code == 200 and r.json() == f"Release session: {rel_id}", r.text
    # Kubernetes notices the host (node grace 10 s), and the Service stops sending anything to its pod
    wait_for(lambda: h2.name not in live.kube.ready_nodes(), timeout=60, what="host2 NotReady")
    t_notready = time.monotonic() - t_crash

    def endpoints() -> set[str]:
        ep = live.kube.api("GET", f"/api/v1/namespaces/{DS}/endpoints/{DS}-toolserver-manager").json()
        return {a.get("targetRef", {}).get("name", "") for s in ep.get("subsets") or [] for a in s.get("addresses") or []}

    wait_for(lambda: pod2 not in endpoints(), timeout=60, what="host2's pod out of the Service's endpoints")
    t_endpoints = time.monotonic() - t_crash
    time.sleep(2)  # kube-proxy's iptables sync (min-sync-period 1 s) on host1
    via_service = [call(service_url(live, st, h1), one_id, timeout=10).status_code for _ in range(10)]
    assert via_service == [200] * 10, via_service
    r = timed("call via the Service, session on host2", lambda: call(service_url(live, st, h1), keep_id))
    assert r.status_code == 503 and h2.addr in r.json()["detail"], r.text
    # the host comes back: its kubelet starts the DaemonSet's pod again on its restarted engine
    t_back = time.monotonic()
    live.kube.recover(h2)
    live.wait_pods_ready(DS, 2, timeout=180)
    t_ready = time.monotonic() - t_back
    # the release sent meanwhile is carried out; the killed session comes back with its file
    wait_for(lambda: rel_cid not in containers(h2), timeout=30, what="the release carried out on host2")
    first = timed("first call after host2 is back, its killed session",
                  lambda: call(service_url(live, st, h1), keep_id, "/download_file", json={"file_path": "keep.txt"}))
    r = first if first.status_code == 200 else wait_for(lambda: (lambda x: x if x.status_code == 200 else None)(
        call(service_url(live, st, h1), keep_id, "/download_file", json={"file_path": "keep.txt"})),
        timeout=60, what="the crashed host's session back")
    assert r.content == b"kept"
    # nothing inconsistent: every record has its container in the state it says, and every container its record
    for h in live.hosts.hosts:
        recs = admin(p1, st, f"/admin/nodes?manager_id={h.name}&limit=1000")["nodes"]
        assert rel_id not in {x["id"] for x in recs}
        assert {x["container_id"]: x["status"] for x in recs if x["container_id"]} == containers(h), h.name
    out("\n| host crash (host2: link cut, kubelet, kube-proxy and dockerd killed) | client saw | s |\n"
                     "| --- | --- | --- |\n")
    for what, saw, _, secs in rows:
        out(f"| {what} | {saw} | {secs:.3f} |\n")
    out(f"| node NotReady in the API | - | {t_notready:.1f} |\n"
                     f"| host2's pod out of the Service's endpoints | - | {t_endpoints:.1f} |\n"
                     f"| 10 calls via the Service afterwards, session on host1 | 200 x10 | - |\n"
                     f"| host2 back: its pod Ready again | - | {t_ready:.1f} |\n")
    st["sessions"]["crash"] = [keep_id, one_id]


def test_uninstall_leaves_no_pod_and_reports_the_nodes(live: Live, daemonset: dict[str, Any]) -> None:
    st = daemonset
    assert "helm uninstall" in st["notes"] and "docker ps -a --filter label=toolserver-manager.manager_id" in st["notes"]
    left_behind = {nid for ids in st["sessions"].values() for nid in ids}
    # nodes check the secret derived from this key: a reinstall that generated a new one gets 401
    # from every node left behind (seen here), so NOTES tell the operator to keep it
    key = live.secret(DS, DS, "node-secret-key")
    took: dict[str, float] = {}  # each phase's seconds: the test took 37-126 s in full runs
    t0 = time.monotonic()
    slow = _watch_termination(live, DS, after=15.0)
    live.helm("uninstall", DS, "-n", DS, "--wait", "--timeout", "2m")
    wait_for(lambda: live.kube.pods(DS) == [], timeout=120, what="no pod left in the release's namespace")
    took["uninstall"] = time.monotonic() - t0
    slow.set()
    # the nodes of the uninstalled managers stay on their engines, as NOTES say: reported here
    out("\n| host | nodes left after helm uninstall (session: state) | workspace volumes |\n"
                     "| --- | --- | --- |\n")
    found: set[str] = set()
    for h in live.hosts.hosts:
        ps = h.docker("ps", "-a", "--filter", f"label={LABEL}", "--format",
                      '{{.Label "toolserver-manager.session_id"}} {{.State}}').stdout.splitlines()
        nodes = dict(line.split() for line in ps if line.strip())
        volumes = h.docker("volume", "ls", "-q", "--filter", f"label={LABEL}").stdout.split()
        found |= set(nodes)
        out(f"| {h.name} | {', '.join(f'{k[:12]}: {v}' for k, v in sorted(nodes.items()))} "
                         f"| {len(volumes)} |\n")
    assert found == left_behind, (found, left_behind)
    try:
        # as NOTES say, a reinstall with the same Redis and node secret key serves them again
        t0 = time.monotonic()
        live.helm("install", DS, str(CHART), "-n", DS, "-f", str(st["values"]), "--set", f"secrets.nodeSecretKey={key}",
                  "--wait", "--timeout", "3m")
        live.wait_pods_ready(DS, 2)
        took["reinstall"] = time.monotonic() - t0
        port = live.node_port(DS, DS)
        firsts, each = [], []
        for nid in sorted(left_behind):
            t0 = time.monotonic()
            firsts.append(served(f"http://{live.h1.addr}:{port}", nid, timeout=60))
            each.append(round(time.monotonic() - t0, 1))
        took["first calls"] = sum(each)
        assert [r.status_code for r in firsts] == [200] * len(firsts), [r.text[:100] for r in firsts]
        out(f"\nfirst call of each left session after the reinstall: {len(firsts)} x 200, seconds each {each}\n")
    finally:
        t0 = time.monotonic()
        live.helm("uninstall", DS, "-n", DS, "--wait", "--timeout", "2m")
        wait_for(lambda: live.kube.pods(DS) == [], timeout=120, what="no pod left after the second uninstall")
        remove_nodes(live)
        took["second uninstall"] = time.monotonic() - t0
        out(f"uninstall test phases, s: { {k: round(v, 1) for k, v in took.items()} }\n")
    for h in live.hosts.hosts:
        assert containers(h) == {}


def _watch_termination(live: Live, namespace: str, after: float) -> threading.Event:
    """Until the event is set: the log of each pod still there `after` seconds from now, printed once
    (what a pod that outlives its SIGTERM was doing: the uninstall took up to the grace period)."""
    done = threading.Event()

    def watch() -> None:
        if done.wait(after):
            return
        with contextlib.suppress(httpx.HTTPError, RuntimeError):
            for pod in live.kube.pods(namespace):
                name, host = pod["metadata"]["name"], pod["spec"].get("nodeName")
                # (the API server cannot reach a kubelet by its name here: the host's engine is asked)
                text = ""
                for h in live.hosts.hosts:
                    if h.name == host:
                        ids = h.docker("ps", "-aq", "--filter", f"label=io.kubernetes.pod.name={name}", "--filter",
                                       "label=io.kubernetes.container.name=manager").stdout.split()
                        logs = h.docker("logs", "--tail", "25", ids[0], check=False) if ids else None
                        text = (logs.stdout + logs.stderr) if logs is not None else "(no container)"
                out(f"\npod {name} on {host} still there {after:g} s into the uninstall "
                    f"(phase {pod['status'].get('phase')}); its log:\n{text[-3000:]}\n")

    threading.Thread(target=watch, daemon=True).start()
    return done


def remove_nodes(live: Live) -> None:
    """What NOTES tell the operator to run on each host once the managers are uninstalled."""
    for h in live.hosts.hosts:
        ids = h.docker("ps", "-aq", "--filter", f"label={LABEL}").stdout.split()
        if ids:
            h.docker("rm", "-f", *ids)
        vols = h.docker("volume", "ls", "-q", "--filter", f"label={LABEL}").stdout.split()
        if vols:
            h.docker("volume", "rm", *vols)


# --- Deployment mode --------------------------------------------------------------------------------

def test_deployment_two_replicas_one_engine_and_the_bundled_redis(live: Live) -> None:
    # one release per engine: another's checker on host1 would take these nodes for strays
    assert live.kube.pods(DS) == [] and all(containers(h) == {} for h in live.hosts.hosts)
    repo, tag = redis_image().split(":")
    values = live.values(DEP, {
        "mode": "deployment", "replicaCount": 2,
        # the two replicas share one engine: both on host1, driving its socket (manager_id = the host)
        "nodeSelector": {"kubernetes.io/hostname": live.h1.name},
        "redis": {"mode": "bundled", "bundled": {"image": {"repository": repo, "tag": tag}}},
    })
    t0 = time.monotonic()
    notes = live.helm("install", DEP, str(CHART), "-n", DEP, "--create-namespace", "-f", str(values),
                    "--wait", "--timeout", "3m").stdout
    took = time.monotonic() - t0
    try:
        pods = live.manager_pods(DEP)
        assert len(pods) == 2 and all(ready(p) and p["spec"]["nodeName"] == live.h1.name for p in pods), pods
        (redis_pod,) = live.kube.pods(DEP, "app.kubernetes.io/component=redis")
        assert ready(redis_pod), redis_pod["status"]
        sts = live.kube.api("GET", f"/apis/apps/v1/namespaces/{DEP}/statefulsets/{DEP}-toolserver-manager-redis")
        assert sts.json()["status"].get("readyReplicas") == 1
        assert "Redis is the bundled single instance" in notes
        port = live.node_port(DEP, DEP)
        try:
            ids = [new_session(f"http://{live.hosts.hosts[i % 2].addr}:{port}")[0] for i in range(4)]
        except AssertionError as exc:  # what both pods said: which one removed what, and why
            raise AssertionError(f"{exc}\n{live.diagnose(DEP)}") from None
        assert owners(live.h1) == {live.h1.name} and len(containers(live.h1)) == 4
        assert containers(live.h2) == {}
        for node_id in ids:  # either replica serves every session (shared Redis, shared engine)
            for pod in pods:
                r = call(pod_url(pod), node_id)
                assert r.status_code == 200 and r.headers["x-tsm-replica"].startswith(pod["metadata"]["name"])
        for node_id in ids:
            assert call(f"http://{live.h2.addr}:{port}", node_id, "/release_session").status_code == 200
        wait_for(lambda: containers(live.h1) == {}, timeout=30, what="the released nodes removed")
        out(f"\nhelm install (deployment, 2 replicas + bundled Redis) --wait: {took:.1f} s; "
                         f"4 sessions served by both replicas\n")
    finally:
        live.helm("uninstall", DEP, "-n", DEP, "--wait", "--timeout", "2m")
        remove_nodes(live)


def test_privileged_modes(live: Live) -> None:
    """hostIsolation (bounded workspaces, host firewall) and Docker-in-Docker need privileged pods."""
    if live.privileged:
        pytest.skip("NOT RUN on the live cluster: privileged containers cannot start on this machine "
                    f"({live.privileged}), so hostIsolation.enabled and docker.dind.enabled were not installed; "
                    "the other tests ran with hostIsolation.enabled=false and config.node.disk.workspace_bytes=0")
    pytest.fail("privileged containers run on this machine: install the chart with hostIsolation.enabled here")


def test_leftovers_of_a_killed_run_are_swept_and_a_live_run_is_not(live: Live) -> None:
    """A killed run's processes outlive it (sessions of their own), its engines too: the next run's
    sweep ends them and removes their directories and namespaces, and leaves a live run alone."""
    stale = STATE / "tsmk-fffe"
    stale.mkdir(parents=True, exist_ok=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (stale / "owner").write_text(str(dead.pid))  # the killed test process
    # one process standing for its kubelet and its host's dockerd (it names both, and the pidfile)
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", str(stale / "kubelet.yaml"),
                               "/run/tsmh-fffe-1.sock"], start_new_session=True)
    pidfile = Path("/run/tsmh-fffe-1.pid")
    pidfile.write_text(str(orphan.pid))
    subprocess.run(["ip", "netns", "add", "host1-fffe"], check=True)
    try:
        assert "fffe" in sweep_stale()
        assert orphan.wait(10) == -9 and not stale.exists()
        assert "host1-fffe" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert live.kube.dir.exists() and live.kube.api_ok("/readyz") and live.tag not in sweep_stale()
    finally:
        if orphan.poll() is None:
            orphan.kill()
        shutil.rmtree(stale, ignore_errors=True)
        subprocess.run(["ip", "netns", "del", "host1-fffe"], capture_output=True)
        pidfile.unlink(missing_ok=True)


def test_chart_values_used_here_are_in_the_schema(live: Live) -> None:
    """The values files the live tests installed with pass the chart's schema (helm lint with them)."""
    for name in (DS, DEP):
        path = live.tmp / f"{name}-values.yaml"
        if path.exists():
            live.helm("lint", str(CHART), "-f", str(path))
