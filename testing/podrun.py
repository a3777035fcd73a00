"""Run a pod spec the chart rendered as a plain container on the local engine, as a kubelet would.

Enough of Kubernetes' semantics for the manager's own pod: the downward API and ``$(VAR)``
expansion in env, configMap/secret/emptyDir/hostPath volumes, the security context (user,
privileged, read-only root) and hostPID. Anything else in the spec fails loudly, so a chart
change that this cannot honour is noticed rather than silently dropped.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
# capability numbers to names (linux/capability.h), for privileged on a host that cannot grant all
CAPS = ["CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ"]  # the ones after AUDIT_READ (PERFMON, BPF, ...) are unknown to older engines


def grantable_caps() -> list[str]:
    """The capabilities this host's engine can give a container (its bounding set)."""
    with open("/proc/self/status") as f:
        bnd = int(next(line.split()[1] for line in f if line.startswith("CapBnd:")), 16)
    return [name for i, name in enumerate(CAPS) if bnd >> i & 1]


def _privileged() -> dict[str, Any]:
    # what privileged means to the engine (every capability and device, no seccomp or AppArmor),
    # spelled out: runc's privileged asks for every capability, which a host that is itself a
    # restricted container (this test machine lacks CAP_SYS_RESOURCE) cannot grant
    return {"cap_add": grantable_caps(), "device_cgroup_rules": ["a *:* rwm"],
            "security_opt": ["seccomp=unconfined", "apparmor=unconfined"]}


def environ(container: dict[str, Any], fields: dict[str, str]) -> dict[str, str]:
    """The container's environment: fieldRefs from ``fields`` (e.g. status.hostIP), $(VAR) expanded."""
    env: dict[str, str] = {}
    for e in container.get("env", []):
        if "value" in e:
            # Kubernetes expands only variables defined earlier in the list
            env[e["name"]] = _REF.sub(lambda m: env.get(m.group(1), m.group(0)), str(e["value"]))
        else:
            path = e["valueFrom"]["fieldRef"]["fieldPath"]
            env[e["name"]] = fields[path]
    return env


def docker_run_kwargs(pod: dict[str, Any], container: dict[str, Any], fields: dict[str, str],
                      files: dict[str, dict[str, str]], scratch: Path) -> dict[str, Any]:
    """docker-py ``containers.run`` kwargs for one container of ``pod``.

    ``files`` gives the content of configMap and secret volumes by volume name (key -> text);
    they are written under ``scratch``.
    """
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    binds: dict[str, dict[str, str]] = {}
    tmpfs: dict[str, str] = {}
    for m in container.get("volumeMounts", []):
        vol = volumes[m["name"]]
        mode = "ro" if m.get("readOnly") else "rw"
        if "hostPath" in vol:
            host = vol["hostPath"]["path"]
            if vol["hostPath"].get("type") == "DirectoryOrCreate":
                os.makedirs(host, exist_ok=True)
            binds[host] = {"bind": m["mountPath"], "mode": mode}
        elif "emptyDir" in vol:
            tmpfs[m["mountPath"]] = ""
        elif "configMap" in vol or "secret" in vol:
            d = scratch / m["name"]
            d.mkdir(parents=True, exist_ok=True)
            for key, text in files[m["name"]].items():
                (d / key).write_text(text)
            source = d / m["subPath"] if "subPath" in m else d
            binds[str(source)] = {"bind": m["mountPath"], "mode": mode}
        else:
            raise ValueError(f"volume {m['name']}: kind not supported here: {sorted(vol)}")
    sc = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    user = f"{sc.get('runAsUser', 0)}:{sc.get('runAsGroup', 0)}"
    kw: dict[str, Any] = {
        "environment": environ(container, fields),
        "volumes": binds,
        "tmpfs": tmpfs,
        "user": user,
        "read_only": bool(sc.get("readOnlyRootFilesystem")),
        "group_add": [str(g) for g in sc.get("supplementalGroups", [])],
    }
    if sc.get("privileged"):
        kw.update(_privileged())
    if pod.get("hostPID"):
        kw["pid_mode"] = "host"
    if sc.get("capabilities", {}).get("drop"):
        kw["cap_drop"] = sc["capabilities"]["drop"]
    if sc.get("capabilities", {}).get("add"):
        kw["cap_add"] = sc["capabilities"]["add"]
    if sc.get("allowPrivilegeEscalation") is False:
        kw["security_opt"] = [*kw.get("security_opt", []), "no-new-privileges"]
    def expand(args: list[str]) -> list[str]:
        return [_REF.sub(lambda m: kw["environment"].get(m.group(1), m.group(0)), a) for a in args]

    if container.get("command"):
        kw["entrypoint"] = expand(container["command"])
    if container.get("args"):
        kw["command"] = expand(container["args"])
    return kw
