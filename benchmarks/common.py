"""Shared pieces of the benchmarks: a manager replica as a real process, ids and cleanup,
percentiles, and the output (a markdown table on stdout, JSON under benchmarks/results/).

The benchmarks run against the same Redis and dockerd as the integration tests, so every id
they make starts with ``bench-``: the Redis key prefix, the manager_id (and so the
``toolserver-manager.manager_id`` label of every container), and everything is removed at the end.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import docker
import docker.errors
import redis

from shared.config import deep_merge
from testing.harness import free_port, remove_project_objects
from testing.redis_env import private_server_args, private_url, redis_url

ROOT = Path(__file__).resolve().parents[1]

# appended to a wrk script: at the end wrk prints one marked JSON line with its summary
WRK_MARK = "WRKJSON "
WRK_REPORT_LUA = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%(mark)s{"requests":%%d,"duration_us":%%d,"bytes":%%d,"p50_us":%%.0f,"p90_us":%%.0f,' ..
    '"p99_us":%%.0f,"mean_us":%%.1f,"max_us":%%.0f,"connect":%%d,"read":%%d,"write":%%d,' ..
    '"status":%%d,"timeout":%%d}\\n',
    summary.requests, summary.duration, summary.bytes, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.mean, latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
"""
RESULTS = Path(__file__).resolve().parent / "results"
REDIS_URL = os.environ.get("TSM_BENCH_REDIS_URL") or redis_url()  # the project's Redis, password included
NODE_IMAGE = os.environ.get("TSM_BENCH_NODE_IMAGE", "toolserver-node:latest")
# raw nodes started by a benchmark (no manager) need a secret too: nodes refuse requests without one
BENCH_NODE_SECRET = "bench-node-secret"
BENCH_NODE_HEADERS = {"X-Node-Secret": BENCH_NODE_SECRET}
NODE_SECRET_KEY = uuid.uuid4().hex  # one per run: every manager of a benchmark derives the same secrets
NODE_PORT = 31942
LABEL = "toolserver-manager.manager_id"
ROLE_LABEL = "toolserver-manager.role"


# --- ids, ports, cleanup --------------------------------------------------------------------------
def bench_id(kind: str) -> str:
    """``bench-<kind>-<random>``: a key prefix or manager_id nobody else uses."""
    return f"bench-{kind}-{uuid.uuid4().hex[:8]}"


def wait_port(port: int, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Until something accepts on 127.0.0.1:port (or the process we wait for has died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def docker_client() -> docker.DockerClient:
    client = docker.DockerClient(base_url=os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock"),
                                 version="1.41", timeout=60)
    client.ping()
    client.images.get(NODE_IMAGE)  # fails early and clearly when the node image is not built
    return client


def redis_client(url: str | None = None) -> redis.Redis:
    r = redis.Redis.from_url(url or REDIS_URL)
    r.ping()
    return r


def start_private_redis(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A redis-server of our own on 127.0.0.1 and a free port (no persistence); returns it and its URL.

    Only for counting commands exactly: the shared Redis also serves everyone else's tests.
    """
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server is not installed: apt-get install -y redis-server")
    port = free_port()
    proc = subprocess.Popen([exe, *private_server_args(port), "--save", "", "--appendonly", "no",
                             "--dir", str(tmp), "--logfile", str(tmp / "redis.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, proc=proc)
    return proc, private_url("127.0.0.1", port)


def remove_containers(client: docker.DockerClient, manager_id: str) -> int:
    """Remove everything labelled with this manager_id; returns how many containers there were."""
    return remove_project_objects(client, manager_id)


def delete_keys(r: redis.Redis, prefix: str) -> int:
    """SCAN + DEL every key under ``prefix:``; returns how many were deleted."""
    n = 0
    batch: list[bytes] = []
    for key in r.scan_iter(match=f"{prefix}:*", count=1000):
        batch.append(key)
        if len(batch) >= 500:
            n += int(r.delete(*batch))
            batch.clear()
    if batch:
        n += int(r.delete(*batch))
    return n


def redis_calls(r: redis.Redis) -> tuple[str, int]:
    """Redis's run_id and the total commands it has executed (sum of ``calls`` over INFO
    commandstats). A changed run_id (restart) or a smaller total (CONFIG RESETSTAT) between two
    readings means their difference is meaningless."""
    run_id = str(r.info("server").get("run_id", ""))
    return run_id, sum(int(v.get("calls", 0)) for v in r.info("commandstats").values() if isinstance(v, dict))


def calls_between(before: tuple[str, int], after: tuple[str, int]) -> int | None:
    """Commands between two ``redis_calls`` readings, or None when Redis restarted or was reset."""
    if before[0] != after[0] or after[1] < before[1]:
        return None
    return after[1] - before[1]


# --- a manager replica as a real process ----------------------------------------------------------
def base_config(prefix: str, manager_id: str, **over: Any) -> dict[str, Any]:
    """A manager config for benchmarks: the project's defaults except ids, Redis and the node's
    creation kwargs, which are the bare ones the raw-Docker floor uses too (image, init)."""
    cfg: dict[str, Any] = {
        "manager_id": manager_id,
        "log_format": "logfmt",
        "logger_level": "INFO",
        "redis": {"url": REDIS_URL, "key_prefix": prefix},
        "engine": {"docker": {"creation_kwargs": {"image": NODE_IMAGE, "init": True}}},
        "cluster": {"internal_token": uuid.uuid4().hex, "node_secret_key": NODE_SECRET_KEY},
        "admin": {"token": uuid.uuid4().hex},
    }
    return deep_merge(cfg, over)


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in (task / "children").read_text().split()]
    return out


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU time of these processes so far."""
    return sum(cpu_split(pids))


def cpu_split(pids: Iterable[int]) -> tuple[float, float]:
    """User and system CPU time of these processes so far, apart: a proxy's own code against the kernel's
    share (system calls, and the loopback's delivery, which the sender's system time carries)."""
    tick = os.sysconf("SC_CLK_TCK")
    user = system = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            user += int(fields[11])  # utime (field 14)
            system += int(fields[12])  # stime (field 15)
    return user / tick, system / tick


# --- statistics and output ------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(values_s: Sequence[float]) -> dict[str, float]:
    """n and p50/p90/p99/min/max of durations in seconds, reported in milliseconds."""
    ms = [v * 1000.0 for v in values_s]
    return {"n": len(ms), "p50_ms": percentile(ms, 50), "p90_ms": percentile(ms, 90),
            "p99_ms": percentile(ms, 99), "min_ms": min(ms, default=math.nan),
            "max_ms": max(ms, default=math.nan)}


def fmt(value: Any, digits: int = 1) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table, columns padded so it also reads well in a terminal."""
    text = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in text) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    out = [line(text[0]), "| " + " | ".join("-" * w for w in widths) + " |"]
    out += [line(r) for r in text[1:]]
    return "\n".join(out)


def command_line() -> str:
    exe = sys.executable
    with contextlib.suppress(ValueError):
        if Path(exe).is_relative_to(Path.cwd()):
            exe = os.path.relpath(exe)
    return " ".join(shlex.quote(a) for a in [exe, "-m", _module_name(), *sys.argv[1:]])


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None else sys.argv[0]


def environment() -> dict[str, Any]:
    return {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "kernel": platform.release(), "node_image": NODE_IMAGE, "redis_url": REDIS_URL,
            "loadavg_at_end": os.getloadavg()}


def load_line(at_start: tuple[float, float, float]) -> str:
    """The 1-minute load average at start and end: other work on the machine skews every figure."""
    return (f"load average (1 min) at start {at_start[0]:.2f}, at end {os.getloadavg()[0]:.2f} "
            f"on {os.cpu_count()} CPUs")


def write_json(name: str, data: dict[str, Any]) -> Path:
    """benchmarks/results/<name>.json (the directory is git-ignored)."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "command": command_line(), "finished_at": time.strftime(
        "%Y-%m-%dT%H:%M:%S%z"), "environment": environment(), **data}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"
