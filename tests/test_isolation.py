"""Isolation of nodes, end to end on the real engine: the per-node secret, the node network,
bounded disk. The network tests play the attacker from inside a node (its shell tool)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator

import docker
import httpx
import pytest
import redis

from shared.config import deep_merge
from testing import redis_env
from testing.harness import bridge_gateway
from testing.hosts import PrivateEngine
from tests.conftest import ADMIN_TOKEN, NODE_IMAGE, wait_for

SECRET_HEADER = "X-Node-Secret"


def new_session(url: str) -> tuple[httpx.Client, str]:
    c = httpx.Client(base_url=url, timeout=60)
    r = c.post("/get_cookie")
    assert r.status_code == 200, r.text
    return c, r.cookies["node_id"]


def node_secret(docker_client: docker.DockerClient, node_id: str) -> str:
    env = docker_client.api.inspect_container(node_id)["Config"]["Env"]
    return next(e.split("=", 1)[1] for e in env if e.startswith("NODE_SECRET="))


def direct_url(docker_client: docker.DockerClient, node_id: str) -> str:
    """Where the manager reaches the node, seen from this host: its address on its network."""
    data = docker_client.api.inspect_container(node_id)
    ports = data["NetworkSettings"]["Ports"].get("31942/tcp") or []
    if ports:
        return f"http://127.0.0.1:{ports[0]['HostPort']}"
    (net,) = data["NetworkSettings"]["Networks"].values()
    return f"http://{net['IPAddress']}:31942"


def test_node_refuses_requests_without_its_secret(start_manager, docker_client: docker.DockerClient) -> None:
    m = start_manager()
    c, node_id = new_session(m.url)
    secret = node_secret(docker_client, node_id)
    assert len(secret) >= 32
    base = direct_url(docker_client, node_id)
    body = {"tool_name": "shell_command_executor", "arguments": {"command": "echo pwned > /app/workspace/p"}}
    for headers in ({}, {SECRET_HEADER: "guess"}):
        assert httpx.post(base + "/execute_tool", json=body, headers=headers, timeout=10).status_code == 401
        assert httpx.get(base + "/", headers=headers, timeout=10).status_code == 401
    assert httpx.get(base + "/", headers={SECRET_HEADER: secret}, timeout=10).status_code == 200
    # the manager adds it, and replaces whatever a client sends in its place
    for headers in ({}, {SECRET_HEADER: "guess"}, {SECRET_HEADER.lower(): secret + "x"}):
        r = c.post("/execute_tool", headers=headers,
                   json={"tool_name": "shell_command_executor", "arguments": {"command": "echo ok"}})
        assert r.status_code == 200, r.text
    r = c.post("/read_file_that_does_not_exist", json={})  # not a proxied path: no secret to leak
    assert secret not in r.text
    c.post("/release_session")


def test_secret_is_never_shown(start_manager, docker_client: docker.DockerClient) -> None:
    m = start_manager()
    c, node_id = new_session(m.url)
    secret = node_secret(docker_client, node_id)
    assert c.post("/get_available_tools").status_code == 200
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    seen = []
    for path in ("/admin/nodes", f"/admin/nodes/{node_id}", "/admin/config", "/admin/replicas"):
        r = httpx.get(m.url + path, headers=admin, timeout=10)
        seen.append(r.text)
        assert r.status_code in (200, 404), (path, r.status_code)
    assert node_id in seen[0] and node_id in seen[1]
    from websockets.sync.client import connect

    with connect(m.url.replace("http", "ws") + "/ws/events?last_event_id=0",
                 additional_headers=admin) as ws:
        for _ in range(3):
            seen.append(ws.recv(timeout=10))
    c.post("/close_session")
    assert c.post("/reconnect_session").status_code == 200
    assert c.post("/get_available_tools").status_code == 200  # same secret after a restart
    c.post("/release_session")
    for text in [*seen, m.logs()]:
        assert secret not in text
    assert json.loads(seen[1])["record"].get("secret") is None


# --- the network, as an attacker inside node A sees it ------------------------------------------
PROBE = r"""
import errno, json, socket, sys
out = []
for host, port in json.loads(sys.argv[1]):
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.settimeout(1.5)
    try:
        s.connect((host, port))
        out.append([host, port, "connected"])
    except socket.timeout:
        out.append([host, port, "timeout"])
    except OSError as exc:
        out.append([host, port, errno.errorcode.get(exc.errno, type(exc).__name__)])
    finally:
        s.close()
print("PROBE" + json.dumps(out))
"""
# what "refused at once" looks like from inside a node: a TCP reset or an ICMP error, never silence
REFUSED_AT_ONCE = {"ECONNREFUSED", "EHOSTUNREACH", "ENETUNREACH", "EACCES", "EPERM"}


def probe_from(c: httpx.Client, targets: list[tuple[str, int]]) -> dict[tuple[str, int], str]:
    """Connect from inside the cookie's node (its shell tool) to each target; what happened."""
    cmd = f"python3 -c {shlex.quote(PROBE)} {shlex.quote(json.dumps(targets))}"
    r = c.post("/execute_tool", json={"tool_name": "shell_command_executor", "arguments": {"command": cmd}},
               timeout=120)
    assert r.status_code == 200, r.text
    display = r.json()["data"]["display"]
    results = json.loads(display.split("PROBE", 1)[1].strip().splitlines()[0])
    return {(h, p): what for h, p, what in results}


class Listener:
    """A TCP listener of the test on the host: accepts and closes."""

    def __init__(self, host: str = "0.0.0.0") -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


def host_ipv4_addresses() -> list[str]:
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout
    return [line.split()[3].split("/")[0] for line in out.splitlines()]


def networks_of(docker_client: docker.DockerClient, node_id: str) -> dict[str, dict[str, str]]:
    return docker_client.api.inspect_container(node_id)["NetworkSettings"]["Networks"]


@contextlib.contextmanager
def outside_host(prefix: str = "198.51") -> Iterator[tuple[str, int]]:
    """A test host in a network namespace of its own, routed from the host like the outside world
    (198.51.x: documentation addresses, routed nowhere else), or like a private network (10.x)."""
    tag = uuid.uuid4().hex[:6]
    ns, veth_h, veth_n = f"tsmt-{tag}", f"tsmv{tag}h", f"tsmv{tag}n"
    third = int(tag[:2], 16) % 200 + 1
    host_ip, ns_ip = f"{prefix}.{third}.1", f"{prefix}.{third}.2"

    def sh(*cmd: str) -> None:
        subprocess.run(cmd, check=True, capture_output=True)

    sh("ip", "netns", "add", ns)
    server = None
    try:
        sh("ip", "link", "add", veth_h, "type", "veth", "peer", "name", veth_n)
        sh("ip", "link", "set", veth_n, "netns", ns)
        sh("ip", "addr", "add", f"{host_ip}/30", "dev", veth_h)
        sh("ip", "link", "set", veth_h, "up")
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{ns_ip}/30", "dev", veth_n)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", veth_n, "up")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        sh("ip", "netns", "exec", ns, "ip", "route", "add", "default", "via", host_ip)
        # a bare accept loop (http.server would first look its own name up, with no DNS in there)
        accept = (f"import socket\ns = socket.socket(); s.bind(('{ns_ip}', 8080)); s.listen(16)\n"
                  "while True:\n    s.accept()[0].close()\n")
        server = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", accept],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: subprocess.run(["ip", "netns", "exec", ns, "python3", "-c",
                                         f"import socket; socket.create_connection(('{ns_ip}', 8080), 1)"],
                                        capture_output=True).returncode == 0, timeout=10, what="outside host")
        yield ns_ip, 8080
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "link", "del", veth_h], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_a_node_reaches_no_other_node_nor_the_host(start_manager, docker_client: docker.DockerClient) -> None:
    m = start_manager()
    a, a_id = new_session(m.url)
    b, b_id = new_session(m.url)
    b_nets = networks_of(docker_client, b_id)
    assert list(b_nets) == list(networks_of(docker_client, a_id))  # the node network, and only it
    (net_name,) = b_nets
    assert net_name.startswith("tsm-")
    gateway = bridge_gateway(docker_client, net_name)
    ports = docker_client.api.inspect_container(b_id)["NetworkSettings"]["Ports"]
    assert all(binding is None for binding in ports.values()), ports  # nothing published
    any_host = Listener("0.0.0.0")
    on_gateway = Listener(gateway)
    try:
        targets = [(net["IPAddress"], port) for net in b_nets.values() for port in (31942, 22, 80, 8080)]
        targets += [(gateway, any_host.port), (gateway, on_gateway.port), (gateway, 6379), (gateway, redis_env.PORT),
                    (gateway, 31942),
                    (gateway, 22)]
        targets += [(ip, any_host.port) for ip in host_ipv4_addresses()]
        targets += [("169.254.169.254", 80)]
        seen = probe_from(a, targets)
        for target, what in seen.items():
            assert what in REFUSED_AT_ONCE, (target, seen)  # not connected, and not left to time out
        assert any_host.accepted == 0 and on_gateway.accepted == 0
        # the host itself still reaches both listeners (they are real)
        socket.create_connection((gateway, on_gateway.port), 2).close()
        # and no IPv6 path to the host either
        r = a.post("/execute_tool", json={"tool_name": "shell_command_executor", "arguments": {
            "command": "echo V6=$(cat /proc/sys/net/ipv6/conf/all/disable_ipv6); echo V6ADDRS=$(cat /proc/net/if_inet6 | wc -l)"}})
        assert r.status_code == 200, r.text
        display = r.json()["data"]["display"]
        assert "V6=1" in display and "V6ADDRS=0" in display, display
    finally:
        any_host.close()
        on_gateway.close()
    # tool calls through the manager keep working for both
    for c in (a, b):
        assert c.post("/get_available_tools").status_code == 200
    a.post("/release_session")
    b.post("/release_session")


def test_an_unprivileged_host_user_cannot_drive_a_node(start_manager, docker_client: docker.DockerClient) -> None:
    m = start_manager()
    c, node_id = new_session(m.url)
    base = direct_url(docker_client, node_id)
    pid = docker_client.api.inspect_container(node_id)["State"]["Pid"]
    script = (f"import urllib.request as u, urllib.error as e\n"
              f"req = u.Request('{base}/execute_tool', method='POST', headers={{'content-type': 'application/json'}},"
              f" data=b'{{\"tool_name\": \"shell_command_executor\", \"arguments\": {{\"command\": \"id\"}}}}')\n"
              f"try:\n    print(u.urlopen(req, timeout=10).status)\nexcept e.HTTPError as x:\n    print(x.code)\n")
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", script],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "401", out
    # nor learn its secret: not from the engine, not from the node's processes
    for cmd in (["cat", "/var/run/docker.sock"], ["cat", f"/proc/{pid}/environ"]):
        res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd],
                             capture_output=True, text=True, timeout=10)
        assert res.returncode != 0 and "NODE_SECRET" not in res.stdout, (cmd, res)
    assert c.post("/get_available_tools").status_code == 200
    c.post("/release_session")


def test_published_ports_are_refused_from_nodes_and_want_the_secret(start_manager,
                                                                   docker_client: docker.DockerClient) -> None:
    """DaemonSet mode: node ports published on the host; nodes still cannot reach them."""
    m = start_manager(node={"network": {"publish": True}})
    a, _a_id = new_session(m.url)
    b, b_id = new_session(m.url)
    ports = docker_client.api.inspect_container(b_id)["NetworkSettings"]["Ports"]["31942/tcp"]
    published = int(ports[0]["HostPort"])
    (net_name,) = networks_of(docker_client, b_id)
    gateway = bridge_gateway(docker_client, net_name)
    targets = [(ip, published) for ip in host_ipv4_addresses()] + [(gateway, published), ("127.0.0.1", published)]
    targets += [(net["IPAddress"], 31942) for net in networks_of(docker_client, b_id).values()]
    seen = probe_from(a, targets)
    for target, what in seen.items():
        assert what != "connected", (target, seen)
    assert httpx.get(f"http://127.0.0.1:{published}/", timeout=10).status_code == 401
    assert b.post("/get_available_tools").status_code == 200
    a.post("/release_session")
    b.post("/release_session")


def test_egress_open_reaches_the_outside_and_none_does_not(start_manager, docker_client: docker.DockerClient,
                                                          manager_id: str) -> None:
    with outside_host() as outside:
        m = start_manager()
        c, _ = new_session(m.url)
        assert probe_from(c, [outside])[outside] == "connected"  # the probe can succeed
        c.post("/release_session")
        closed = start_manager(name="closed", node={"network": {"egress": "none"}})
        c, node_id = new_session(closed.url)
        assert list(networks_of(docker_client, node_id)) == [f"tsm-{manager_id}-none"]
        assert probe_from(c, [outside])[outside] != "connected"
        assert c.post("/get_available_tools").status_code == 200  # the manager still reaches it
        c.post("/release_session")


def test_bad_isolation_settings_fail_at_start(start_manager) -> None:
    m = start_manager(wait=False, node={"network": {"egress": "sometimes"}})
    assert m.proc is not None and m.proc.wait(30) != 0
    assert "node.network.egress must be one of open, none, not 'sometimes'" in m.logs()


# --- disk ------------------------------------------------------------------------------------------
MiB = 1 << 20
DISK = {"workspace_bytes": 256 * MiB, "tmp_bytes": 32 * MiB, "log_bytes": 2 * MiB}


def shell(c: httpx.Client, command: str) -> str:
    r = c.post("/execute_tool", json={"tool_name": "shell_command_executor", "arguments": {"command": command}},
               timeout=120)
    assert r.status_code in (200, 500), r.text
    body = r.json()
    return str((body.get("data") or body.get("detail") or {}).get("display", body))


def workspace_image(docker_client: docker.DockerClient, node_id: str) -> str:
    (vol,) = [m["Name"] for m in docker_client.api.inspect_container(node_id)["Mounts"]
              if m["Destination"] == "/app/workspace"]
    return str(docker_client.api.inspect_volume(vol)["Labels"]["toolserver-manager.image_file"])


def loop_devices_of(path: str) -> str:
    return subprocess.run(["losetup", "--associated", path], capture_output=True, text=True).stdout.strip()


def test_a_node_cannot_write_more_than_its_bound(start_manager, docker_client: docker.DockerClient) -> None:
    m = start_manager(node={"disk": DISK})
    a, a_id = new_session(m.url)
    b, _ = new_session(m.url)
    image = workspace_image(docker_client, a_id)
    assert loop_devices_of(image)
    # the workspace keeps its contents across close and reconnect
    shell(a, "echo kept > /app/workspace/keep.txt")
    assert a.post("/close_session").status_code == 200
    assert a.post("/reconnect_session").status_code == 200
    assert "kept" in shell(a, "cat /app/workspace/keep.txt")

    free_before = shutil.disk_usage(image).free
    answers: list[int] = []
    done = threading.Event()

    def other_session() -> None:
        while not done.is_set():
            answers.append(b.post("/get_available_tools", timeout=30).status_code)

    t = threading.Thread(target=other_session)
    t.start()
    try:
        out = shell(a, "dd if=/dev/zero of=/app/workspace/big bs=1M count=512 2>&1; "
                       "dd if=/dev/zero of=/tmp/big bs=1M count=64 2>&1; touch /opt/x 2>&1; sync")
    finally:
        done.set()
        t.join()
    assert out.count("No space left on device") == 2, out
    assert "Read-only file system" in out, out
    drop = free_before - shutil.disk_usage(image).free
    assert drop <= DISK["workspace_bytes"] + 64 * MiB, drop
    assert os.stat(image).st_blocks * 512 <= DISK["workspace_bytes"]
    assert answers and set(answers) == {200}, answers
    assert "kept" in shell(a, "cat /app/workspace/keep.txt")
    # released: the volume, its loop device and its image are gone
    vol = next(mt["Name"] for mt in docker_client.api.inspect_container(a_id)["Mounts"]
               if mt["Destination"] == "/app/workspace")
    assert a.post("/release_session").status_code == 200
    assert not os.path.exists(image) and not loop_devices_of(image)
    assert not docker_client.volumes.list(filters={"name": vol})
    b.post("/release_session")


def test_a_node_flooding_stdout_leaves_a_bounded_log(start_manager, docker_client: docker.DockerClient) -> None:
    m = start_manager(node={"disk": DISK})
    c, node_id = new_session(m.url)
    # 50 MB at the container's own stdout, in lines of 1000 bytes: written by the node's server (a
    # registered tool runs in it), since a tool's process runs as another uid and cannot reach it
    code = ("def flood_log(n: int):\n"
            "    import sys\n"
            "    for _ in range(n // 1000):\n"
            "        sys.stdout.write('x' * 999 + '\\n')\n"
            "    sys.stdout.flush()\n")
    assert c.post("/register_new_tool", json={"tool_name": "flood_log", "code": code}).status_code == 200
    r = c.post("/execute_tool", json={"tool_name": "flood_log", "arguments": {"n": 50_000_000}}, timeout=120)
    assert r.status_code == 200, r.text
    log_path = docker_client.api.inspect_container(node_id)["LogPath"]
    files = [p for p in (log_path, log_path + ".1", log_path + ".2") if os.path.exists(p)]
    total = sum(os.path.getsize(p) for p in files)
    assert os.path.getsize(log_path) + (os.path.getsize(log_path + ".1") if log_path + ".1" in files else 0) > MiB
    assert total <= DISK["log_bytes"] + 64 * 1024, (files, total)
    assert c.post("/get_available_tools").status_code == 200
    c.post("/release_session")


def test_orphan_workspaces_are_collected(start_manager, docker_client: docker.DockerClient, manager_id: str,
                                         redis_client: redis.Redis, prefix: str) -> None:
    # the tests' 20 s wait for a node: 5 s timed the session's creation out at load 19 (full run
    # s9); no step of the collection depends on it
    m = start_manager(node={"disk": DISK, "tiers": {"orphan_workspace_grace_seconds": 1}},
                      # a workspace is first seen ownerless by a pass that lists them, every 30th
                      # (STORAGE_GC_CYCLES): 6 s apart at 0.2 s, not 15 s at the tests' 0.5 s
                      checker={"stuck_creation_seconds": 1, "interval_seconds": 0.2})
    _c, node_id = new_session(m.url)
    image = workspace_image(docker_client, node_id)
    docker_client.api.remove_container(node_id, force=True)  # behind the manager's back: archived, kept
    wait_for(lambda: redis_client.hget(f"{prefix}:node:{node_id}", "status") == b"archived", timeout=10,
             what="the session archived")
    assert os.path.exists(image)
    # its record lost too: a workspace of no session, collected after the grace period
    redis_client.delete(f"{prefix}:node:{node_id}")
    redis_client.srem(f"{prefix}:mgr:{manager_id}:nodes", node_id)
    wait_for(lambda: not os.path.exists(image), timeout=40, what="the orphan workspace collected")
    assert not loop_devices_of(image)
    assert not docker_client.volumes.list(filters={"label": f"toolserver-manager.manager_id={manager_id}"})


# --- runtime ---------------------------------------------------------------------------------------
def test_nodes_run_under_gvisor_when_asked(private_engine: PrivateEngine, start_manager) -> None:  # type: ignore[no-untyped-def]
    # runsc is registered with the run's private engine (its own config file), never the machine's
    m = start_manager(**deep_merge(private_engine.manager_overrides(), {"engine": {"docker": {"runtime": "runsc"}}}))
    c, node_id = new_session(m.url)
    engine = private_engine.client()
    try:
        assert engine.api.inspect_container(node_id)["HostConfig"]["Runtime"] == "runsc"
        (net_name,) = networks_of(engine, node_id)
        gateway = private_engine.bridge_address(net_name)
        secret = node_secret(engine, node_id)
    finally:
        engine.close()
    # gVisor's own kernel answers (it says 4.4.0), not the host's
    assert "4.4.0" in shell(c, "uname -r") and os.uname().release != "4.4.0"
    # uids split as under runc, though gVisor has no ambient capabilities (entrypoint.sh): a tool runs
    # as 1000 and neither signals the server (uid 1001) nor finds the node secret in its environment
    # (gVisor shows any process's /proc/<pid>/environ: the server blanks its NODE_* values there)
    out = shell(c, "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline | grep -qx 'python3 -m app ' && "
                   "s=${p#/proc/}; done; echo server=$s uid=$(awk '/^Uid:/ {print $2}' /proc/$s/status); "
                   "cat /proc/$s/environ; kill -0 $s && echo signalled; echo; id -u")
    assert "server=" in out and "server= " not in out and "uid=1001" in out, out
    assert len(secret) >= 32 and secret not in out and "signalled" not in out and "\n1000\n" in out, out
    # a listener of the engine's host (its namespace), which the host itself reaches
    with private_engine.listener(reach=gateway) as port:
        seen = probe_from(c, [(gateway, port), ("169.254.169.254", 80)])
    assert all(what != "connected" for what in seen.values()), seen
    c.post("/release_session")


def test_an_unknown_runtime_fails_the_start_naming_it(start_manager, docker_client: docker.DockerClient,
                                                      manager_id: str) -> None:
    m = start_manager(wait=False, engine={"docker": {"runtime": "no-such-runtime"}})
    assert m.proc is not None and m.proc.wait(30) != 0
    assert "engine.docker.runtime 'no-such-runtime' is not registered with the engine" in m.logs()
    assert not docker_client.containers.list(all=True, sparse=True, filters={"label": f"toolserver-manager.manager_id={manager_id}"})


@pytest.mark.parametrize("how", ["config", "environment"])
def test_a_workspace_bound_refuses_an_engine_on_another_host(start_manager, monkeypatch, how: str) -> None:  # type: ignore[no-untyped-def]
    # a loop device made here would be mounted, or not, on whatever that engine's host has
    remote = "tcp://127.0.0.1:9"
    if how == "environment":
        monkeypatch.setenv("DOCKER_HOST", remote)
        m = start_manager(wait=False)
    else:
        m = start_manager(wait=False, docker_host=remote)
    assert m.proc is not None and m.proc.wait(30) != 0
    assert f"node.disk.workspace_bytes needs the engine on this host (workspaces are loop devices here), " \
           f"not {remote}; set it to 0" in m.logs()


def test_a_runtime_gone_from_the_engine_fails_creation_naming_it(private_engine: PrivateEngine, start_manager,  # type: ignore[no-untyped-def]
                                                                   manager_id: str) -> None:
    owned = {"label": f"toolserver-manager.manager_id={manager_id}"}
    engine = private_engine.client()
    private_engine.set_runtime("tsm-vanishing", {"path": shutil.which("runc") or "runc"})
    try:
        m = start_manager(**deep_merge(private_engine.manager_overrides(), {"engine": {"docker": {"runtime": "tsm-vanishing"}}}))
        c, _ = new_session(m.url)  # known at start: nodes run
        c.post("/release_session")
        wait_for(lambda: not engine.containers.list(all=True, sparse=True, filters=owned), timeout=30)
    finally:
        private_engine.set_runtime("tsm-vanishing", None)
    volumes_before = {v.name for v in engine.volumes.list(filters=owned)}
    # the engine forgot it since: creation names the cause and leaves nothing half-made
    r = httpx.post(m.url + "/get_cookie", timeout=60)
    assert r.status_code == 502, r.text
    assert "engine.docker.runtime 'tsm-vanishing' is not registered with the engine" in r.json()["detail"]
    assert "node_id" not in r.cookies
    assert not engine.containers.list(all=True, sparse=True, filters=owned)
    assert {v.name for v in engine.volumes.list(filters=owned)} <= volumes_before
    admin = httpx.get(m.url + "/admin/nodes", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10)
    assert admin.status_code == 200 and admin.json()["nodes"] == [], admin.text
    engine.close()


# --- who may create nodes --------------------------------------------------------------------------
def test_a_default_cap_from_the_engines_memory(start_manager, docker_client: docker.DockerClient) -> None:
    total = int(docker_client.info()["MemTotal"])
    # nodes so large that the engine's memory holds one (they use nothing near it: a limit only)
    m = start_manager(node={"creation_kwargs": {"mem_limit": str(total // 2 + 1)}})
    a, _ = new_session(m.url)
    r = httpx.post(m.url + "/get_cookie", timeout=60)
    assert r.status_code == 503 and "at capacity (1 nodes)" in r.json()["detail"], r.text
    assert len(docker_client.containers.list(all=True, sparse=True, filters={"label": f"toolserver-manager.manager_id={m.cfg['manager_id']}"})) == 1
    a.post("/release_session")
    # overridable: -1 lifts it
    lifted = start_manager(name="lifted", node={"creation_kwargs": {"mem_limit": str(total // 2 + 1)}},
                           cluster={"max_nodes_per_manager": -1})
    clients = [new_session(lifted.url)[0] for _ in range(2)]
    for c in clients:
        c.post("/release_session")


def test_client_api_keys_when_set(start_manager, tmp_path) -> None:  # type: ignore[no-untyped-def]
    keyfile = tmp_path / "keys"
    keyfile.write_text("from-file\n")
    m = start_manager(client_auth={"api_keys": ["k-one"], "api_keys_file": str(keyfile)})
    for path in ("/alive", "/ready", "/metrics"):
        assert httpx.get(m.url + path, timeout=10).status_code == 200, path
    for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": ""}):
        r = httpx.post(m.url + "/get_cookie", headers=headers, timeout=30)
        assert r.status_code == 401 and r.json() == {"detail": "missing or invalid API key"}
    assert httpx.get(m.url + "/openapi.json", timeout=10).status_code == 401
    c = httpx.Client(base_url=m.url, timeout=60, headers={"X-API-Key": "k-one"})
    assert c.post("/get_cookie").status_code == 200
    assert c.post("/get_available_tools").status_code == 200
    # a client that cannot set headers: the key as a cookie, next to node_id
    by_cookie = httpx.Client(base_url=m.url, timeout=60, cookies={"tsm_api_key": "k-one",
                                                                  "node_id": c.cookies["node_id"]})
    assert by_cookie.post("/get_available_tools").status_code == 200
    # the key from the file is a key too, but a session answers only to the key that made it: to
    # another, k-one's session is as unknown as a node_id nobody made
    other = httpx.Client(base_url=m.url, timeout=60, cookies={"tsm_api_key": "from-file",
                                                              "node_id": c.cookies["node_id"]})
    unknown = httpx.Client(base_url=m.url, timeout=60, cookies={"tsm_api_key": "from-file", "node_id": "0" * 64})
    theirs, nobodys = other.post("/get_available_tools"), unknown.post("/get_available_tools")
    assert theirs.status_code == nobodys.status_code == 403, theirs.text
    assert theirs.json() == {"detail": f"invalid node_id: {c.cookies['node_id']}"}, theirs.text
    assert nobodys.json() == {"detail": f"invalid node_id: {'0' * 64}"}, nobodys.text
    own = httpx.Client(base_url=m.url, timeout=60, cookies={"tsm_api_key": "from-file"})
    assert own.post("/get_cookie").status_code == 200
    assert own.post("/get_available_tools").status_code == 200
    own.post("/release_session")
    bare = httpx.Client(base_url=m.url, timeout=60, cookies={"node_id": c.cookies["node_id"]})
    assert bare.post("/get_available_tools").status_code == 401
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    with pytest.raises(InvalidStatus) as err, \
            connect(m.url.replace("http", "ws") + "/ws/echo",
                    additional_headers={"Cookie": f"node_id={c.cookies['node_id']}"}):
        pass
    assert err.value.response.status_code == 401
    with connect(m.url.replace("http", "ws") + "/ws/echo",
                 additional_headers={"Cookie": f"node_id={c.cookies['node_id']}; tsm_api_key=k-one"}) as ws:
        ws.send("hi")
        assert ws.recv(timeout=10) == "hi"
    assert "k-one" not in httpx.get(m.url + "/admin/config", timeout=10,
                                    headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).text
    c.post("/release_session")


def test_without_the_firewall_privilege_ready_says_so(start_manager, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # a manager that cannot run iptables (here: not on its PATH), and no loop devices either
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    m = start_manager(node={"disk": {"workspace_bytes": 0}})
    ready = httpx.get(m.url + "/ready", timeout=10).json()
    assert ready["status"] == "ready"
    assert ready["isolation"]["firewall"] == "not installed: iptables is not installed", ready
    assert m.logs().count("firewall_not_installed") == 1
    c, _ = new_session(m.url)  # nodes still run, on their network
    assert c.post("/get_available_tools").status_code == 200
    c.post("/release_session")


def test_allowed_private_ranges(start_manager, docker_client: docker.DockerClient, manager_id: str) -> None:
    with outside_host(prefix="10.213") as private:
        m = start_manager()
        c, _ = new_session(m.url)
        assert probe_from(c, [private])[private] != "connected"  # private: refused by default
        c.post("/release_session")
        allowed = start_manager(name="allowed", node={"network": {"allow_cidrs": ["10.213.0.0/16"]}})
        c, _node_id = new_session(allowed.url)
        try:
            assert probe_from(c, [private])[private] == "connected"
        finally:
            c.post("/release_session")
        bridge = docker_client.api.inspect_network(f"tsm-{manager_id}-open")["Options"][
            "com.docker.network.bridge.name"]
        assert allow_rules(bridge) == ["10.213.0.0/16"]
        # the exception is the configuration's, not the chain's: a start without it takes it away
        again = start_manager(name="again")
        assert allow_rules(bridge) == []
        c, _ = new_session(again.url)
        assert probe_from(c, [private])[private] != "connected"
        c.post("/release_session")


def allow_rules(bridge: str) -> list[str]:
    out = subprocess.run(["iptables", "-w", "-S", "TSM-ALLOW"], capture_output=True, text=True, check=True).stdout
    return [line.split(" -d ")[1].split()[0] for line in out.splitlines() if f" -i {bridge} " in line]


def test_exceptions_of_a_network_that_is_gone_are_dropped() -> None:
    from shared import firewall
    from shared.firewall import BRIDGE_PREFIXES

    def install() -> None:  # idempotent: the chains exactly as any manager's start leaves them
        firewall.install(BRIDGE_PREFIXES["open"], BRIDGE_PREFIXES["none"])

    install()
    gone = BRIDGE_PREFIXES["open"] + "gone" + uuid.uuid4().hex[:6]  # a bridge no host has
    subprocess.run(["iptables", "-w", "-A", "TSM-ALLOW", "-i", gone, "-d", "10.99.0.0/16", "-j", "ACCEPT"], check=True)
    assert allow_rules(gone) == ["10.99.0.0/16"]
    install()
    assert allow_rules(gone) == []


def test_a_node_refusing_its_probe_fails_creation_naming_why(start_manager, docker_client: docker.DockerClient,
                                                             manager_id: str) -> None:
    # a node that checks some other secret: every probe gets 401
    m = start_manager(node={"creation_kwargs": {"command": ["sh", "-c", "NODE_SECRET=other exec python3 -m app"]}})
    r = httpx.post(m.url + "/get_cookie", timeout=60)
    assert r.status_code == 503, r.text
    assert "refused its probe with 401" in r.json()["detail"] and "x-node-secret" in r.json()["detail"]
    wait_for(lambda: not docker_client.containers.list(
        all=True, filters={"label": f"toolserver-manager.manager_id={manager_id}"}), timeout=10, what="nothing left")
    assert not docker_client.volumes.list(filters={"label": f"toolserver-manager.manager_id={manager_id}"})


async def test_replicas_racing_to_make_the_node_network_agree_on_one(manager_id: str, prefix: str,
                                                                     docker_client: docker.DockerClient) -> None:
    # the workers of one manager start together; each must end up with the same, single network. A
    # loser of the race may be refused before the winner's network is listed (1 round in 20 failed
    # so, and stopped a two-worker manager in CI): rounds of fresh owners give that window its chances
    from shared.config import load_config
    from shared.engines.docker import DockerBackend

    for round_ in range(12):
        owner = f"{manager_id}-r{round_}"
        cfg = load_config(None, environ={}, overrides={"manager_id": owner, "redis": {"key_prefix": prefix}})
        backends = [DockerBackend(cfg) for _ in range(4)]
        try:
            names = await asyncio.gather(*(b.ensure_network(owner) for b in backends))
            nets = docker_client.networks.list(filters={"label": f"toolserver-manager.manager_id={owner}"})
            assert len(set(names)) == 1
            assert [n.name for n in nets] == names[:1], round_
        finally:
            for b in backends:
                await b.close()
            for n in docker_client.networks.list(filters={"label": f"toolserver-manager.manager_id={owner}"}):
                n.remove()


async def test_a_volume_the_engine_makes_for_a_node_carries_its_manager_id(manager_id: str, prefix: str,
                                                                         docker_client: docker.DockerClient) -> None:
    # a workspace removed between its creation and the container's: the engine makes the named
    # volume anew, silently; it must carry the manager_id so clean-up by label finds it
    from shared.config import load_config
    from shared.engines.base import NewNode
    from shared.engines.docker import DockerBackend

    cfg = load_config(None, environ={}, overrides={
        "manager_id": manager_id, "redis": {"key_prefix": prefix},
        "engine": {"docker": {"creation_kwargs": {"image": NODE_IMAGE}}}})
    backend = DockerBackend(cfg)
    missing = f"tsm-session-{manager_id}-gone"
    try:
        cid = await backend.create(NewNode(owner=manager_id, role="node", replica_id="r", created_at=0.0,
                                           workspace=missing))
        assert cid
        made = docker_client.volumes.get(missing)
        assert (made.attrs["Labels"] or {}).get("toolserver-manager.manager_id") == manager_id, made.attrs
    finally:
        for c in docker_client.containers.list(all=True, sparse=True, filters={"label": f"toolserver-manager.manager_id={manager_id}"}):
            c.remove(force=True, v=True)
        with contextlib.suppress(docker.errors.NotFound):
            docker_client.volumes.get(missing).remove(force=True)
        await backend.close()
