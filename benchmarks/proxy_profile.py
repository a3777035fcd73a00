"""Where a proxied request's CPU goes in the manager: py-spy samples one replica (``workers: 1``)
while wrk drives one body at a time through it, and the table lists the functions that were on
CPU most (own time: the innermost frame of a sample) and the ones most often under way
(inclusive: anywhere in a sample's stack), as a share of the samples.

The set-up is proxy_throughput's: one node made through ``POST /get_cookie``, the 100 B file
uploaded into its workspace, the same wrk scripts (``GET /`` 25 B and ``POST /download_file``
100 B), a Redis of the manager's own. py-spy comes with the ``[bench]`` extra (``scripts/setup.sh
--test`` installs it); it reads the process from outside (``--nonblocking``), so the figures are a
profile, not a rate: proxy_throughput measures µs per request without it.

    .venv/bin/python -m benchmarks.proxy_profile [--duration 10] [--connections 32] [--top 20]
        [--bodies hello,100B] [--rate 250]
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks._support import node_direct, run_wrk
from benchmarks.common import (
    ROOT,
    base_config,
    bench_id,
    command_line,
    cpu_seconds,
    delete_keys,
    docker_client,
    load_line,
    markdown_table,
    process_tree,
    redis_client,
    remove_containers,
    start_private_redis,
    write_json,
)
from benchmarks.proxy_throughput import BODY_CHOICES, check_target, lua_script, need
from testing.harness import ManagerProc, stop_process


def pyspy() -> str:
    exe = Path(sys.executable).parent / "py-spy"
    if exe.exists():
        return str(exe)
    return need("py-spy", "bash scripts/setup.sh --test (the [bench] extra)")


def short(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (file.py)`` relative to the repo or site-packages;
    the line number is dropped so one function's samples add up."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path = where.rsplit(":", 1)[0]
    for root in (str(ROOT) + "/", "site-packages/", "/lib/python3"):
        if root in path:
            path = path.split(root, 1)[1]
            break
    return f"{name} ({path})"


def parse(raw: str) -> tuple[int, collections.Counter[str], collections.Counter[str]]:
    """py-spy's raw (collapsed) output: total samples, own-time and inclusive counts per function."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [short(f) for f in stack.split(";")]
        total += n
        own[frames[-1]] += n
        for f in set(frames[1:]):  # the first frame is the thread ("process 123:...")
            incl[f] += n
    return total, own, incl


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.proxy_profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=int, default=10, help="seconds of wrk (and sampling) per body (default 10)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument("--top", type=int, default=20, help="functions listed per table (default 20)")
    p.add_argument("--bodies", default="hello,100B", help="subset of hello,100B,64KiB (default hello,100B)")
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second (default 250)")
    args = p.parse_args(argv)
    bodies = [BODY_CHOICES[b] for b in args.bodies.split(",") if b]
    print(f"$ {command_line()}", flush=True)
    load0 = os.getloadavg()
    need("wrk", "apt-get install -y wrk")
    spy = pyspy()
    prefix, mid = bench_id("prof"), bench_id("prof")
    tmp = Path(tempfile.mkdtemp(prefix="tsm-bench-prof-"))
    client, r0 = docker_client(), redis_client()
    r0.close()
    redis_proc, redis_url = start_private_redis(tmp)
    r = redis_client(redis_url)
    files = {b.file: os.urandom(b.size) for b in bodies if b.file}
    manager = ManagerProc(base_config(prefix, mid, workers=1, redis={"url": redis_url}), tmp, "prof")
    results: dict[str, Any] = {}
    node_id = ""
    failed = True
    try:
        manager.start()
        resp = httpx.post(manager.url + "/get_cookie", timeout=120)
        if resp.status_code != 200:
            raise RuntimeError(f"/get_cookie answered {resp.status_code}: {resp.text[:300]}")
        node_id = resp.cookies["node_id"]
        host, port, secret = node_direct(client, node_id)
        with httpx.Client(timeout=10, headers={"X-Node-Secret": secret}) as c:
            for name, data in files.items():
                up = c.post(f"http://{host}:{port}/upload_file", files={"file": (name, data, "application/octet-stream")})
                if up.status_code != 200:
                    raise RuntimeError(f"upload of {name} failed: {up.status_code} {up.text[:200]}")
        check_target(manager.url, node_id, bodies, files, secret)
        pids = process_tree(manager.pid)
        for i, b in enumerate(bodies):
            script = tmp / f"body{i}.lua"
            script.write_text(lua_script(b, node_id, secret))
            run_wrk(manager.url + b.path, script, 1, args.connections, 2)  # warm-up
            out = tmp / f"profile{i}.txt"
            spy_proc = subprocess.Popen([spy, "record", "--pid", str(manager.pid), "--rate", str(args.rate),
                                         "--duration", str(args.duration + 1), "--format", "raw", "--nonblocking",
                                         "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(0.5)
            cpu0 = cpu_seconds(pids)
            res = run_wrk(manager.url + b.path, script, args.duration, args.connections, 2)
            cpu = cpu_seconds(pids) - cpu0
            _, err = spy_proc.communicate(timeout=60)
            if not out.exists():
                raise RuntimeError(f"py-spy wrote no profile: {err.decode(errors='replace')[-500:]}")
            total, own, incl = parse(out.read_text())
            results[b.label] = {"samples": total, "requests": res["requests"], "rps": res["rps"],
                                "cpu_us_per_request_profiled": cpu / max(1, res["requests"]) * 1e6,
                                "own": own.most_common(args.top), "inclusive": incl.most_common(args.top)}
            print(f"  {b.label}: {res['rps']:.0f} req/s under the profiler, {total} samples", file=sys.stderr,
                  flush=True)
        failed = False
    finally:
        if node_id:
            httpx.post(manager.url + "/release_session", headers={"Cookie": f"node_id={node_id}"}, timeout=60)
        manager.stop()
        remove_containers(client, mid)
        delete_keys(r, prefix)
        r.close()
        stop_process(redis_proc)
        client.close()
        if failed:
            sys.stderr.write(f"----- manager log -----\n{manager.logs()[-4000:]}\n")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    for label, res in results.items():
        total = max(1, res["samples"])
        print(f"\n{label}: {res['samples']} samples over {args.duration} s, {res['rps']:.0f} req/s, "
              f"{res['cpu_us_per_request_profiled']:.0f} CPU µs/request while profiled")
        rows = []
        for (fo, no), (fi, ni) in zip(res["own"], res["inclusive"], strict=False):
            rows.append([f"{100 * no / total:.1f}%", fo, f"{100 * ni / total:.1f}%", fi])
        print(markdown_table(["own", "function (own time)", "inclusive", "function (inclusive)"], rows))
    print(load_line(load0))
    path = write_json("proxy_profile", {"params": vars(args), "loadavg_at_start": load0, "bodies": results})
    print(f"raw numbers: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
