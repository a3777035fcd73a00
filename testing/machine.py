"""What a test run may not change on the machine, and what it may not leave behind.

A run uses the machine's dockerd and Redis; it never stops, restarts, flushes or reconfigures
them (faults go to a private engine and Redis: testing.hosts.PrivateEngine, harness.PrivateRedis).
``snapshot`` is taken when the run starts and again when it ends; ``problems`` names every
difference: the dockerd pid, each Redis's ``run_id``, the checksum of the engine's daemon.json,
and objects the run made and did not remove (containers, volumes, networks, image tags, loop
devices, firewall chains and rules, namespaces, the second engine's data and lock, big files in
pytest's temp dir).

Leftovers are counted only when they are this run's (``RUN``: the manager_ids, image tags and
host tags its tests used) or new since the start and owned by nobody, so another run on the same
machine at the same time is never blamed on this one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATE = Path(os.environ.get("TSM_STATE_DIR", "/var/lib/toolserver-manager"))
LABEL = "toolserver-manager.manager_id"
# where the machine's engine keeps its pid and config; the check's own test points these at an engine of its own
DOCKER_PIDFILE = Path(os.environ.get("TSM_CHECK_DOCKER_PIDFILE", "/var/run/docker.pid"))
DAEMON_JSON = Path(os.environ.get("TSM_CHECK_DAEMON_JSON", "/etc/docker/daemon.json"))
ENGINE2_NAME = os.environ.get("TSM_ENGINE2_NAME", "tsm-engine2")
BIG_FILE = 50 << 20  # a node image is ~200 MB; nothing a test writes to its tmp_path comes near


@dataclass
class Run:
    """What this run's tests made, by name: so its leftovers are told from another run's."""

    manager_ids: set[str] = field(default_factory=set)
    images: set[str] = field(default_factory=set)
    host_tags: set[str] = field(default_factory=set)


RUN = Run()


@dataclass
class Snapshot:
    dockerd_pid: str
    redis_run_ids: dict[str, str]
    daemon_json: str
    containers: dict[str, str]  # id -> manager_id
    volumes: dict[str, str]  # name -> manager_id
    networks: dict[str, str]  # name -> manager_id
    images: set[str]  # tags
    volume_images: set[str]  # the loop images named by any volume (in use by someone)
    loops: dict[str, str]  # device -> back file
    firewall: set[str]  # iptables -S lines of the project's chains and jumps
    netns: set[str]
    paths: set[str]  # engine data, locks, /run files of the project's test engines
    lasting_loops: set[str] = field(default_factory=set)  # of no volume, and still so a while later


def _dockerd_pid() -> str:
    try:
        pid = DOCKER_PIDFILE.read_text().strip()
    except OSError as exc:
        return f"no pid file ({exc.strerror})"
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return f"{pid} (not running)"
    return pid if comm == "dockerd" else f"{pid} ({comm})"


def _run_id(url: str) -> str:
    import redis

    try:
        with redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2) as r:
            return str(r.info("server")["run_id"])
    except redis.RedisError as exc:  # not there, or not ours to read: still must stay so
        return f"unreachable ({type(exc).__name__})"


def _sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return "absent"


def _lines(*argv: str) -> list[str]:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return out.stdout.splitlines()


def _firewall() -> set[str]:
    lines = {line for line in _lines("iptables", "-w", "5", "-S") if re.search(r"TSM-|tsm", line)}
    # the egress tables (shared/egress/nft.py), one per enforcing bridge
    return lines | {f"nft {line}" for line in _lines("nft", "list", "tables") if "tsm_egress_" in line}


def _loops() -> dict[str, str]:
    raw = subprocess.run(["losetup", "-J", "-l"], capture_output=True, text=True).stdout
    with contextlib.suppress(ValueError):
        return {d["name"]: d.get("back-file") or "" for d in json.loads(raw or "{}").get("loopdevices", [])}
    return {}


def _paths() -> set[str]:
    found = {str(p) for p in STATE.glob("tsmh-*")} | {str(p) for p in Path("/run").glob("tsmh-*")}
    # second engines (scripts/second-engine.sh): test_cluster names each after its run
    found |= {str(p) for p in STATE.glob(f"{ENGINE2_NAME}*-data")} | {str(p) for p in Path("/run").glob(f"{ENGINE2_NAME}*")}
    found |= {str(p) for p in Path("/tmp").glob(f"{ENGINE2_NAME}*.lock")}
    return found


def _orphan_loops(client: Any) -> set[str]:
    """Loop devices on the project's workspace images that no volume names."""
    named = {(v.get("Labels") or {}).get("toolserver-manager.image_file")
             for v in client.api.volumes().get("Volumes") or []}
    return {dev for dev, f in _loops().items()
            if (str(STATE) in f or f.endswith(".img")) and f.replace(" (deleted)", "") not in named}


def lasting_orphan_loops(client: Any, settle: float = 3.0) -> set[str]:
    """Orphan loop devices still orphans ``settle`` seconds later: another run on the machine makes its
    image and loop device a moment before its volume, and removes them a moment after."""
    first = _orphan_loops(client)
    if not first:
        return set()
    deadline = time.monotonic() + settle
    while first and time.monotonic() < deadline:
        time.sleep(0.5)
        first &= _orphan_loops(client)
    return first


def snapshot(client: Any, redis_urls: list[str], settle: bool = False) -> Snapshot:
    """The machine as a run sees it now. ``client``: a DockerClient on the machine's engine."""
    containers = {c["Id"]: (c.get("Labels") or {}).get(LABEL, "")
                  for c in client.api.containers(all=True, filters={"label": LABEL})}
    volumes: dict[str, str] = {}
    volume_images: set[str] = set()
    for v in client.volumes.list():
        labels = v.attrs.get("Labels") or {}
        if LABEL in labels or v.name.startswith("tsm-"):
            volumes[v.name] = labels.get(LABEL, "")
        if labels.get("toolserver-manager.image_file"):
            volume_images.add(labels["toolserver-manager.image_file"])
    networks = {n.name: (n.attrs.get("Labels") or {}).get(LABEL, "")
                for n in client.networks.list() if n.name.startswith("tsm-") or LABEL in (n.attrs.get("Labels") or {})}
    images = {tag for img in client.images.list() for tag in img.tags}
    return Snapshot(
        dockerd_pid=_dockerd_pid(), redis_run_ids={u: _run_id(u) for u in redis_urls},
        daemon_json=_sha256(DAEMON_JSON), containers=containers, volumes=volumes, networks=networks,
        images=images, volume_images=volume_images, loops=_loops(), firewall=_firewall(),
        netns={line.split()[0] for line in _lines("ip", "netns", "list") if line.strip()},
        paths=_paths(), lasting_loops=lasting_orphan_loops(client) if settle else set())


def _redact(url: str) -> str:
    return re.sub(r"//[^@/]*@", "//", url)


def _ours(rule: str) -> bool:
    """A firewall line this run answers for: the project's chains and jumps, the exceptions of its
    manager_ids' bridges, its test hosts' rules (not the engine's rules for bridges that are live)."""
    from shared.egress.nft import table_name
    from shared.firewall import BRIDGE_PREFIXES

    if rule.startswith("-N TSM-") or (re.search(r"-j TSM-(INPUT|FORWARD|ALLOW)\b", rule) and "-A TSM-" not in rule):
        return True
    bridges = {p + hashlib.sha256(mid.encode()).hexdigest()[:10] for mid in RUN.manager_ids
               for p in BRIDGE_PREFIXES.values()}
    if rule.startswith("nft table inet "):
        # a table per bridge: another run's (or the user's own manager's) tables are not this run's
        return rule.split()[-1] in {table_name(b) for b in bridges}
    return (any(b in rule for b in bridges) and rule.startswith("-A TSM-")) \
        or any(f"tsmhbr{t}" in rule for t in RUN.host_tags)


def problems(before: Snapshot, after: Snapshot, tmp_root: Path | None = None) -> list[str]:
    """Every way the run changed the machine's services or left its objects behind."""
    out = []
    if after.dockerd_pid != before.dockerd_pid:
        out.append(f"the machine's dockerd changed: pid {before.dockerd_pid} at the start, {after.dockerd_pid} now "
                   f"(a test stopped or restarted it)")
    for url, run_id in before.redis_run_ids.items():
        if after.redis_run_ids.get(url) != run_id:
            out.append(f"Redis {_redact(url)} changed: run_id {run_id} at the start, {after.redis_run_ids.get(url)} now "
                       f"(a test shut it down or restarted it)")
    if after.daemon_json != before.daemon_json:
        out.append(f"{DAEMON_JSON} changed: sha256 {before.daemon_json} at the start, {after.daemon_json} now")
    mine = RUN.manager_ids
    for kind, b, a in (("containers", before.containers, after.containers),
                       ("volumes", before.volumes, after.volumes), ("networks", before.networks, after.networks)):
        left = sorted(f"{k[:12]} ({mid})" for k, mid in a.items() if k not in b and mid in mine)
        if left:
            out.append(f"{kind} of this run's manager_ids left on the engine: {', '.join(left)}")
    left_images = sorted((after.images - before.images) & RUN.images)
    if left_images:
        out.append(f"images this run tagged are still there: {', '.join(left_images)}")
    loops = sorted(f"{dev} ({f})" for dev, f in after.loops.items() if dev not in before.loops
                   and dev in after.lasting_loops)
    if loops:
        out.append(f"loop devices backed by the project's images, of no volume: {', '.join(loops)}")
    fw = sorted(line for line in after.firewall - before.firewall if _ours(line))
    if fw:
        out.append(f"firewall chains or rules added and not removed: {'; '.join(fw)}")
    tags = RUN.host_tags
    ns = sorted(n for n in after.netns - before.netns if any(t in n for t in tags))
    if ns:
        out.append(f"network namespaces of this run's test hosts left: {', '.join(ns)}")
    paths = sorted(p for p in after.paths - before.paths if any(t in p for t in tags))
    if paths:
        out.append(f"engine data, sockets or locks left: {', '.join(paths)}")
    if tmp_root is not None and tmp_root.exists():
        big = sorted(str(p) for p in tmp_root.rglob("*") if p.is_file() and not p.is_symlink()
                     and p.stat().st_size > BIG_FILE)
        if big:
            out.append(f"big files (node image copies?) left in pytest's temp dir: {', '.join(big)}")
    return out
