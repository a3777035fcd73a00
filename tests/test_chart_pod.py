"""The chart's DaemonSet pod, run for real as a kubelet would (testing/podrun.py) with the manager
image: its rendered security context, volumes, hostPID and environment, in a network namespace of
its own like a pod's, against a Redis on the engine's bridge.

Only the privileged pod is run here (hostIsolation, the default): workspaces are bounded and the
host firewall lands in the engine's network namespace (nsenter), not in the pod's own. A real
kubelet cannot start it on this machine (root privileged containers fail: runc cannot apply every
capability), while podrun grants the capabilities the machine has. Everything a kubelet can run is
run on a live cluster by tests/test_kubernetes.py, the unprivileged pod included.
"""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
import yaml

from testing import podrun, redis_env
from testing.harness import bridge_gateway, free_port
from testing.manager_image import manager_image as built_manager_image
from tests.conftest import ADMIN_TOKEN, NODE_IMAGE, ROOT, wait_for
from tests.test_isolation import Listener, allow_rules, new_session, probe_from, shell

IMAGE = "toolserver-manager:chart-pod-test"
MiB = 1 << 20


class Pod:
    def __init__(self, container: Any, url: str, spec: dict[str, Any]) -> None:
        self.container, self.url, self.spec = container, url, spec

    def status(self) -> dict[str, Any]:
        """/ready's answer once the manager answers it."""
        def ready() -> Any:
            try:
                r = httpx.get(self.url + "/ready", timeout=5)
            except httpx.HTTPError:
                return None
            return r.json() if r.status_code in (200, 503) else None

        return wait_for(ready, timeout=60, what=f"the pod's /ready (logs: {self.container.logs()[-2000:]!r})")


@pytest.fixture(scope="module")
def manager_image(docker_client: docker.DockerClient) -> Iterator[str]:
    """The manager image (built only if its sources changed), under this module's tag while it runs."""
    with built_manager_image(docker_client, IMAGE) as image:
        yield image


@pytest.fixture
def run_pod(docker_client: docker.DockerClient, manager_image: str, manager_id: str, manager_id_b: str,
            prefix: str, tmp_path: Path) -> Iterator[Callable[[list[str]], Pod]]:
    """Render the chart in daemonset mode with these --set values and run its manager pod."""
    helm = subprocess.run(["bash", str(ROOT / "scripts/install-helm.sh")], capture_output=True, text=True,
                          check=True).stdout.strip().splitlines()[-1]
    gateway = bridge_gateway(docker_client, "bridge")
    redis_port = free_port()
    redis_proc = subprocess.Popen(["redis-server", *redis_env.private_server_args(redis_port, bind=gateway), "--save", "",
                                   "--appendonly", "no", "--protected-mode", "no", "--dir", str(tmp_path)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started: list[Any] = []

    def run(sets: list[str]) -> Pod:
        repo, tag = manager_image.split(":")
        sets = ["mode=daemonset", "redis.mode=external", f"config.redis.url={redis_env.private_url(gateway, redis_port)}",
                f"config.redis.key_prefix={prefix}", f"image.repository={repo}", f"image.tag={tag}",
                f"config.engine.docker.creation_kwargs.image={NODE_IMAGE}", f"secrets.adminToken={ADMIN_TOKEN}",
                "secrets.internalToken=pod-test-internal", *sets]
        out = subprocess.run([helm, "template", "tsm", str(ROOT / "helm/toolserver-manager"),
                              *[a for s in sets for a in ("--set", s)]], capture_output=True, text=True,
                             check=True).stdout
        docs = [d for d in yaml.safe_load_all(out) if d]
        (ds,) = [d for d in docs if d["kind"] == "DaemonSet"]
        pod = ds["spec"]["template"]["spec"]
        (container,) = [c for c in pod["containers"] if c["name"] == "manager"]
        (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and "manager.yml" in d.get("data", {})]
        (secret,) = [d for d in docs if d["kind"] == "Secret"]
        secrets = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
        kw = podrun.docker_run_kwargs(pod, container, {"spec.nodeName": manager_id, "status.hostIP": gateway,
                                                       "status.podIP": "127.0.0.1"},
                                      {"config": cm["data"], "secrets": secrets}, tmp_path / "pod")
        port = free_port()
        # labelled under another manager_id: its own checker would take it for a stray node
        mgr = docker_client.containers.run(manager_image, detach=True, ports={"8080/tcp": ("127.0.0.1", port)},
                                           labels={"toolserver-manager.manager_id": manager_id_b,
                                                   "toolserver-manager.role": "test"}, **kw)
        started.append(mgr)
        return Pod(mgr, f"http://127.0.0.1:{port}", pod)

    try:
        yield run
    finally:
        for mgr in started:
            mgr.remove(force=True)
        redis_proc.kill()
        redis_proc.wait()


def test_the_default_daemonset_pod_bounds_disk_and_installs_the_host_firewall(
        run_pod: Callable[[list[str]], Pod], docker_client: docker.DockerClient, manager_id: str) -> None:
    pod = run_pod([f"config.node.disk.workspace_bytes={64 * MiB}", "config.node.network.allow_cidrs={10.214.0.0/16}"])
    status = pod.status()
    assert status["status"] == "ready", status
    assert status["isolation"]["firewall"] == "installed", status
    assert status["isolation"]["disk"].startswith(f"workspace {64 * MiB} bytes"), status
    # the exception of this manager's bridge is in the host's chain: the host namespace has it
    net = docker_client.api.inspect_network(f"tsm-{manager_id}-open")
    assert allow_rules(net["Options"]["com.docker.network.bridge.name"]) == ["10.214.0.0/16"]
    gateway = bridge_gateway(docker_client, "bridge")
    c, _ = new_session(pod.url)
    listener = Listener("0.0.0.0")
    try:
        seen = probe_from(c, [(bridge_gateway(docker_client, net["Name"]), listener.port), (gateway, listener.port)])
        assert all(what != "connected" for what in seen.values()), seen
    finally:
        listener.close()
    written = shell(c, "dd if=/dev/zero of=/app/workspace/big bs=1M count=128 2>&1; df -B1 /app/workspace")
    assert "No space left on device" in written, written
    assert c.post("/release_session").status_code == 200
