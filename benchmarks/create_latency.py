"""Cold ``POST /get_cookie`` latency against two raw-Docker floors, measured in the same run.

floor (same work): what the manager's node needs, done straight with the Docker SDK and the
         same loop-disk code: a sparse image of ``node.disk.workspace_bytes`` made into ext4 and
         attached as a loop device, a volume on that device, ``create_container`` with the very
         HostConfig the manager gave its warm-up node (limits, capabilities, read-only root and
         tmpfs, log bounds, the node network with its firewall, no published port) and the mount
         pointed at the new volume, ``start``, an inspect for the node's address, then ``GET /``
         with the node's secret every 10 ms until the first HTTP 200.
floor (bare): the node image alone on the default bridge (port published on 127.0.0.1,
         ``init=True``), no workspace, no limits: what a container costs at least.
manager: ``POST /get_cookie`` on a manager replica (no warm pool) with the project's default node
         settings and the benchmark's image, from the request to the response (the manager
         returns once the node answers its probe).

Trials rotate through the cases so a drifting machine hurts all alike; each container (and
workspace) is removed, and each session released, after its trial, outside the timed part.
One untimed warm-up trial of each goes first. Goal: manager p50 within 1.15x the same-work
floor's p50, and manager p99 within 2x its own p50.

    .venv/bin/python -m benchmarks.create_latency [--n 20]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import http.client
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx

from benchmarks.common import (
    BENCH_NODE_HEADERS,
    BENCH_NODE_SECRET,
    LABEL,
    NODE_IMAGE,
    NODE_PORT,
    ROLE_LABEL,
    base_config,
    bench_id,
    command_line,
    delete_keys,
    docker_client,
    fmt,
    load_line,
    markdown_table,
    redis_client,
    remove_containers,
    summarize,
    verdict,
    write_json,
)
from shared.config import DockerConfig, NodeConfig
from shared.engines.docker import loopdisk
from testing.harness import ManagerProc

GOAL_RATIO = 1.15
GOAL_TAIL = 2.0  # manager p99 within this many times its own p50
POLL_S = 0.010
READY_TIMEOUT_S = 30.0
IMAGE_FILE_LABEL = "toolserver-manager.image_file"  # what cleanup (remove_project_objects) detaches


def http_ok(host: str, port: int) -> bool:
    """One ``GET /`` on a fresh connection; True on HTTP 200."""
    conn = http.client.HTTPConnection(host, port, timeout=1.0)
    try:
        conn.request("GET", "/", headers=BENCH_NODE_HEADERS)
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def wait_http(host: str, port: int, t0: float, what: str) -> None:
    deadline = t0 + READY_TIMEOUT_S
    while not http_ok(host, port):
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{what} did not answer within {READY_TIMEOUT_S}s")
        time.sleep(POLL_S)


def floor_trial(client: docker.DockerClient, floor_mid: str) -> float:
    """Bare floor: seconds from create to the node's first 200; the container is removed afterwards."""
    t0 = time.perf_counter()
    c = client.containers.create(NODE_IMAGE, init=True, ports={f"{NODE_PORT}/tcp": ("127.0.0.1", None)},
                                 labels={LABEL: floor_mid, ROLE_LABEL: "bench"},
                                 environment={"NODE_SECRET": BENCH_NODE_SECRET})
    try:
        c.start()
        c.reload()
        port = int(c.attrs["NetworkSettings"]["Ports"][f"{NODE_PORT}/tcp"][0]["HostPort"])
        wait_http("127.0.0.1", port, t0, f"floor container {c.short_id}")
        return time.perf_counter() - t0
    finally:
        c.remove(force=True, v=True)


class SameWork:
    """The same-work floor, modelled on a node the manager made: its HostConfig (limits, network,
    read-only root, tmpfs, log bounds) as the engine reports it, with the workspace mount pointed
    at a fresh loop-mounted volume of the same size, made by the same code (shared/engines/docker/loopdisk.py)."""

    def __init__(self, client: docker.DockerClient, floor_mid: str, node_id: str) -> None:
        disk = NodeConfig().disk
        self.client, self.floor_mid = client, floor_mid
        self.size, self.image_dir = disk.workspace_bytes, disk.image_dir
        self.workspace_path = NodeConfig().workspace_path
        attrs = client.api.inspect_container(node_id)
        self.image = attrs["Config"]["Image"]
        self.host_config: dict[str, Any] = attrs["HostConfig"]
        self.network = self.host_config["NetworkMode"]
        mounts = self.host_config.get("Mounts") or []
        if not any(m.get("Target") == self.workspace_path for m in mounts):
            raise RuntimeError(f"the manager's node has no workspace mount at {self.workspace_path}: {mounts}")
        if not self.size:
            raise RuntimeError("node.disk.workspace_bytes is 0 by default: nothing to loop-mount")
        self.phases: list[dict[str, float]] = []  # per trial: phase -> seconds

    def describe(self) -> str:
        hc = self.host_config
        return (f"network {self.network}, workspace {self.size >> 20} MiB ext4 on a loop device, "
                f"memory {hc.get('Memory')}, nano_cpus {hc.get('NanoCpus')}, pids {hc.get('PidsLimit')}, "
                f"read-only root {hc.get('ReadonlyRootfs')}, cap_add {hc.get('CapAdd')}")

    def trial(self) -> float:
        """Seconds from the workspace's first byte to the node's first 200; all removed afterwards."""
        name = f"bench-floor-{uuid.uuid4().hex[:12]}"
        path = os.path.join(self.image_dir, name + ".img")
        api = self.client.api
        cid = ""
        t0 = time.perf_counter()
        took: dict[str, float] = {}
        mark = t0

        def lap(phase: str) -> None:  # the same phases as the manager's creation metric
            nonlocal mark
            now = time.perf_counter()
            took[phase] = now - mark
            mark = now

        dev = loopdisk.create(path, self.size)
        try:
            api.create_volume(name, driver="local", driver_opts={"type": "ext4", "device": dev},
                              labels={LABEL: self.floor_mid, IMAGE_FILE_LABEL: path})
            lap("workspace")
            hc = copy.deepcopy(self.host_config)
            hc["Mounts"] = [{**m, "Source": name} if m.get("Target") == self.workspace_path else m
                            for m in hc.get("Mounts") or []]
            cid = api.create_container(self.image, host_config=hc, environment={"NODE_SECRET": BENCH_NODE_SECRET},
                                       labels={LABEL: self.floor_mid, ROLE_LABEL: "bench"})["Id"]
            lap("create")
            api.start(cid)
            ip = api.inspect_container(cid)["NetworkSettings"]["Networks"][self.network]["IPAddress"]
            lap("start")
            wait_http(ip, NODE_PORT, t0, f"same-work floor container {cid[:12]}")
            lap("probe")
            self.phases.append(took)
            return time.perf_counter() - t0
        finally:
            if cid:
                api.remove_container(cid, force=True, v=True)
            with contextlib.suppress(docker.errors.NotFound):
                for _ in range(20):  # the engine lets go of a removed container's volume a moment later
                    try:
                        api.remove_volume(name, force=True)
                        break
                    except docker.errors.APIError as exc:
                        if isinstance(exc, docker.errors.NotFound):
                            raise
                        time.sleep(0.1)
            loopdisk.destroy(path)


PHASES = ("queue", "record", "workspace", "create", "start", "probe", "ready_write")


def manager_phases(log: str, n: int) -> list[dict[str, float]]:
    """The phases of the manager's last n creations, from its node_ready log lines (phases_ms=k:v,...)."""
    out: list[dict[str, float]] = []
    for line in log.splitlines():
        if " node_ready " in line and "phases_ms=" in line:
            field = line.split("phases_ms=", 1)[1].split()[0]
            out.append({k: float(v) / 1000 for k, v in (kv.split(":") for kv in field.split(",") if ":" in kv)})
    return out[-n:] if n else []


def phase_rows(floor: list[dict[str, float]], mgr: list[dict[str, float]]) -> list[list[Any]]:
    """Per phase: the floor's and the manager's p50, p90, p99 and max (ms); a trial's slowest phases
    say where a spike came from."""
    rows: list[list[Any]] = []
    for ph in PHASES:
        f = summarize([t[ph] for t in floor if ph in t])
        m = summarize([t[ph] for t in mgr if ph in t])
        if not m["n"] and not f["n"]:
            continue
        rows.append([ph, fmt(f["p50_ms"]), fmt(m["p50_ms"]), fmt(f["p90_ms"]), fmt(m["p90_ms"]),
                     fmt(f["p99_ms"]), fmt(m["p99_ms"]), fmt(m["max_ms"])])
    return rows


def cold_session(http: httpx.Client) -> tuple[float, str]:
    """Seconds of one cold ``POST /get_cookie``, and the session's id."""
    http.cookies.clear()
    t0 = time.perf_counter()
    resp = http.post("/get_cookie")
    elapsed = time.perf_counter() - t0
    if resp.status_code != 200 or "node_id" not in resp.cookies:
        raise RuntimeError(f"/get_cookie answered {resp.status_code}: {resp.text[:300]}")
    node_id = resp.cookies["node_id"]
    http.cookies.clear()
    return elapsed, node_id


def release(http: httpx.Client, node_id: str) -> None:
    rel = http.post("/release_session", headers={"Cookie": f"node_id={node_id}"})
    if rel.status_code != 200:
        raise RuntimeError(f"/release_session answered {rel.status_code}: {rel.text[:300]}")


def manager_trial(http: httpx.Client) -> float:
    """Seconds of one cold ``POST /get_cookie``; the session is released afterwards."""
    elapsed, node_id = cold_session(http)
    release(http, node_id)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.create_latency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20, help="timed sessions per case (default 20)")
    p.add_argument("--max-seconds", type=float, default=240.0,
                   help="stop starting new trials after this long (default 240)")
    args = p.parse_args(argv)

    print(f"$ {command_line()}", flush=True)
    load0 = os.getloadavg()
    prefix, mid, floor_mid = bench_id("lat"), bench_id("lat"), bench_id("floor")
    tmp = Path(tempfile.mkdtemp(prefix="tsm-bench-lat-"))
    client, r = docker_client(), redis_client()
    # the project's default node settings (limits, node network, bounded workspace), this image
    engine = {"docker": {"creation_kwargs": {**DockerConfig().creation_kwargs, "image": NODE_IMAGE}}}
    manager = ManagerProc(base_config(prefix, mid, engine=engine), tmp, "latency")
    same: list[float] = []
    bare: list[float] = []
    mgr: list[float] = []
    failed = True
    started = time.monotonic()
    described = ""
    floor_phases: list[dict[str, float]] = []
    log_text = ""
    try:
        manager.start()
        with httpx.Client(base_url=manager.url, timeout=READY_TIMEOUT_S + 10) as http:
            # warm-up (image layers, engine caches, the node network); the floor copies this node's set-up
            _, warm = cold_session(http)
            floor = SameWork(client, floor_mid, warm)
            described = floor.describe()
            floor_phases = floor.phases
            release(http, warm)
            floor.trial()
            floor_trial(client, floor_mid)
            for i in range(args.n):
                if time.monotonic() - started > args.max_seconds:
                    print(f"time budget of {args.max_seconds:.0f}s reached after {i} trials", file=sys.stderr)
                    break
                same.append(floor.trial())
                mgr.append(manager_trial(http))
                bare.append(floor_trial(client, floor_mid))
        failed = False
    finally:
        manager.stop()
        log_text = manager.logs()
        # the floor's containers first: they sit on the manager's node network
        leftovers = remove_containers(client, floor_mid) + remove_containers(client, mid)
        deleted = delete_keys(r, prefix)
        if failed:
            sys.stderr.write(f"----- manager log ({manager.log_path}) -----\n{manager.logs()[-6000:]}\n")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        client.close()
        r.close()

    ss, bs, ms = summarize(same), summarize(bare), summarize(mgr)
    ratio = ms["p50_ms"] / ss["p50_ms"]
    tail = ms["p99_ms"] / ms["p50_ms"]

    def row(name: str, s: dict[str, float]) -> list[Any]:
        return [name, s["n"], fmt(s["p50_ms"]), fmt(s["p90_ms"]), fmt(s["p99_ms"]), fmt(s["max_ms"]),
                f"{s['p50_ms'] / ss['p50_ms']:.2f}"]

    print()
    print(f"same-work floor: {described}")
    print(markdown_table(["case", "n", "p50 ms", "p90 ms", "p99 ms", "max ms", "p50 ratio to same-work floor"], [
        row("floor, same work: workspace + create + start → first 200", ss),
        row("manager: POST /get_cookie (cold)", ms),
        row("floor, bare: SDK create + start → first 200", bs),
    ]))
    mgr_phases = manager_phases(log_text, len(mgr))
    floor_phases = floor_phases[-len(same):] if same else []
    print("\nwhere the time goes, by phase (ms; the manager's from toolserver_node_create_phase_duration_seconds' "
          "per-creation log, the floor's timed alike):")
    print(markdown_table(["phase", "floor p50", "manager p50", "floor p90", "manager p90", "floor p99",
                          "manager p99", "manager max"], phase_rows(floor_phases, mgr_phases)))
    slow = sorted(range(len(mgr)), key=lambda i: mgr[i])[-max(1, len(mgr) // 10):]
    if len(mgr_phases) == len(mgr):
        print("slowest manager trials: " + "; ".join(
            f"{mgr[i] * 1000:.0f} ms = " + ", ".join(f"{k} {v * 1000:.0f}" for k, v in sorted(
                mgr_phases[i].items(), key=lambda kv: -kv[1])[:3]) for i in reversed(slow)))
    ok = ratio <= GOAL_RATIO
    ok_tail = tail <= GOAL_TAIL
    print(f"\ngoal: manager p50 ≤ {GOAL_RATIO:.2f}× same-work floor p50: {verdict(ok)} "
          f"({ms['p50_ms']:.1f} ms vs {ss['p50_ms']:.1f} ms, {ratio:.2f}×; {ms['p50_ms'] - ss['p50_ms']:+.1f} ms)")
    print(f"goal: manager p99 ≤ {GOAL_TAIL:.0f}× its p50: {verdict(ok_tail)} ({tail:.2f}×)")
    print(load_line(load0))
    if leftovers:
        print(f"note: removed {leftovers} leftover container(s) at cleanup", file=sys.stderr)
    path = write_json("create_latency", {
        "params": {"n": args.n, "poll_interval_s": POLL_S, "image": NODE_IMAGE, "manager_id": mid,
                   "key_prefix": prefix, "same_work_floor": described},
        "floor_same_work": {**ss, "samples_ms": [v * 1000 for v in same]},
        "floor_bare": {**bs, "samples_ms": [v * 1000 for v in bare]},
        "manager": {**ms, "samples_ms": [v * 1000 for v in mgr]},
        "phases_s": {"floor_same_work": floor_phases, "manager": mgr_phases},
        "ratio_p50": ratio, "goal_ratio": GOAL_RATIO, "goal_met": ok, "tail_ratio": tail, "goal_tail_met": ok_tail,
        "cleanup": {"containers_removed": leftovers, "keys_deleted": deleted}, "loadavg_at_start": load0,
    })
    print(f"results: {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
