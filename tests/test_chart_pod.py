"""The chart's DaemonSet pod without host privileges (hostIsolation.enabled false), run for real as a
kubelet would (testing/podrun.py) with the manager image: by default it takes the socket's group,
whatever its GID on this host, and runs as uid 10001 with it: the engine answers, /ready is 200."""

from __future__ import annotations

import base64
import os
import subprocess
from pathlib import Path
from typing import Any

import docker
import httpx
import yaml

from testing import podrun
from testing.harness import free_port
from tests.conftest import ADMIN_TOKEN, NODE_IMAGE, ROOT, wait_for

IMAGE = "toolserver-manager:chart-pod-test"


def _render(helm: str, sets: list[str]) -> tuple[dict[str, Any], dict[str, Any], dict[str, dict[str, str]]]:
    out = subprocess.run([helm, "template", "tsm", str(ROOT / "helm/toolserver-manager"),
                          *[a for s in sets for a in ("--set", s)]], capture_output=True, text=True, check=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    (ds,) = [d for d in docs if d["kind"] == "DaemonSet"]
    pod = ds["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "manager"]
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and "manager.yml" in d.get("data", {})]
    (secret,) = [d for d in docs if d["kind"] == "Secret"]
    secrets = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    return pod, container, {"config": cm["data"], "secrets": secrets}


def test_the_unprivileged_daemonset_pod_opens_the_socket_by_default(docker_client: docker.DockerClient,
                                                                    manager_id: str, manager_id_b: str,
                                                                    prefix: str, tmp_path: Path) -> None:
    subprocess.run(["bash", str(ROOT / "scripts/build-manager-image.sh")], check=True, capture_output=True,
                   env={**os.environ, "TSM_MANAGER_IMAGE": IMAGE})
    helm = subprocess.run(["bash", str(ROOT / "scripts/install-helm.sh")], capture_output=True, text=True,
                          check=True).stdout.strip().splitlines()[-1]
    gateway = docker_client.networks.get("bridge").attrs["IPAM"]["Config"][0]["Gateway"]
    redis_port = free_port()
    redis_proc = subprocess.Popen(["redis-server", "--bind", gateway, "--port", str(redis_port), "--save", "",
                                   "--appendonly", "no", "--protected-mode", "no", "--dir", str(tmp_path)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    repo, tag = IMAGE.split(":")
    pod, container, files = _render(helm, [
        "mode=daemonset", "hostIsolation.enabled=false", "config.node.disk.workspace_bytes=0",
        "redis.mode=external", f"config.redis.url=redis://{gateway}:{redis_port}/0", f"config.redis.key_prefix={prefix}",
        f"image.repository={repo}", f"image.tag={tag}", f"config.node.creation_kwargs.image={NODE_IMAGE}",
        f"secrets.adminToken={ADMIN_TOKEN}", "secrets.internalToken=pod-test-internal"])
    sock_gid = os.stat("/var/run/docker.sock").st_gid
    assert sock_gid not in pod["securityContext"].get("supplementalGroups", []), "nothing set by hand"
    kw = podrun.docker_run_kwargs(pod, container, {"spec.nodeName": manager_id, "status.hostIP": gateway,
                                                   "status.podIP": "127.0.0.1"}, files, tmp_path / "pod")
    port = free_port()
    mgr = docker_client.containers.run(IMAGE, detach=True, ports={"8080/tcp": ("127.0.0.1", port)},
                                       labels={"toolserver-manager.manager_id": manager_id_b,
                                               "toolserver-manager.role": "test"}, **kw)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> Any:
            try:
                r = httpx.get(url + "/ready", timeout=5)
            except httpx.HTTPError:
                return None
            return r.json() if r.status_code in (200, 503) else None

        status = wait_for(ready, timeout=60, what=f"the pod's /ready (logs: {mgr.logs()[-2000:]!r})")
        assert status.get("status") == "ready" and status["engine"] == "ok", (status, mgr.logs()[-3000:])
        # the manager runs as uid 10001 with the socket's group and no capability, not as root
        proc = mgr.exec_run(["cat", "/proc/1/status"]).output.decode()
        fields = dict(line.split(":", 1) for line in proc.splitlines() if ":" in line)
        assert fields["Uid"].split()[:2] == ["10001", "10001"], proc
        assert fields["Gid"].split()[:2] == ["10001", "10001"], proc
        assert fields["Groups"].split() == [str(sock_gid)], proc
        assert int(fields["CapEff"], 16) == 0 and int(fields["CapPrm"], 16) == 0, proc
    finally:
        mgr.remove(force=True)
        redis_proc.kill()
        redis_proc.wait()
