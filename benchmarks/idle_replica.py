"""What a replica does with no request (issue 26): its CPU a second by thread, the times its event
loop sleeps and wakes, and (with --strace) its system calls, for a replica started as
proxy_throughput starts it (``python -m manager.main``, a private Redis, one session).

The idle CPU counts in proxy_throughput's CPU per request (its "idle share"); this measures it
alone, over longer windows. Absolute figures swing with the machine's load: compare the same
run's figures, or alternate runs of two versions under the bench lock.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.common import (
    base_config,
    bench_id,
    command_line,
    docker_client,
    load_line,
    markdown_table,
    process_tree,
    remove_containers,
    start_private_redis,
    write_json,
)
from testing.harness import ManagerProc, stop_process


def thread_cpu(pids: list[int]) -> dict[int, tuple[int, str]]:
    """Thread id -> (user + system clock ticks so far, its comm name)."""
    out = {}
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
                out[int(tid)] = (int(fields[11]) + int(fields[12]), Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip())
            except OSError:
                pass
    return out


def thread_names(pid: int) -> dict[int, str]:
    """Python's thread names (py-spy dump), where py-spy is installed."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.path.exists(spy):
        return {}
    dump = subprocess.run([spy, "dump", "-p", str(pid)], capture_output=True, text=True).stdout
    return {int(t): n for t, n in re.findall(r'Thread (\d+) \(\w+\): "(.*)"', dump)}


def strace(pid: int, seconds: float, *args: str) -> str:
    out = tempfile.mktemp(prefix="tsm-idle-strace-")
    subprocess.run(["timeout", "-s", "INT", str(seconds), "strace", "-f", *args, "-o", out, "-p", str(pid)],
                   capture_output=True)
    text = Path(out).read_text()
    os.unlink(out)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.idle_replica", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=30, help="the CPU window (default 30)")
    p.add_argument("--strace", type=float, default=0, metavar="SECONDS",
                   help="also count system calls and the loop's waits with strace for this long (default 0: off)")
    args = p.parse_args(argv)
    print(f"$ {command_line()}", flush=True)
    load0 = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="tsm-bench-idle-"))
    prefix, mid = bench_id("idle"), bench_id("idle")
    redis_proc, url = start_private_redis(tmp)
    manager = ManagerProc(base_config(prefix, mid, workers=1, redis={"url": url}), tmp, "w1")
    result: dict[str, object] = {}
    try:
        manager.start()
        with httpx.Client(base_url=manager.url, timeout=60) as c:
            if (resp := c.post("/get_cookie")).status_code != 200:
                raise RuntimeError(f"/get_cookie answered {resp.status_code}: {resp.text[:300]}")
            for _ in range(100):  # every cache filled, as after proxy_throughput's warm-up
                c.get("/")
        time.sleep(5)
        pids = process_tree(manager.pid)
        tick = os.sysconf("SC_CLK_TCK")
        a, t0 = thread_cpu(pids), time.monotonic()
        time.sleep(args.seconds)
        b, elapsed = thread_cpu(pids), time.monotonic() - t0
        names = thread_names(manager.pid)
        per = {tid: (b[tid][0] - a.get(tid, (0, ""))[0]) / tick / elapsed * 1000 for tid in b}
        rows = [[names.get(tid, b[tid][1]), f"{ms:.1f}"] for tid, ms in sorted(per.items(), key=lambda x: -x[1])]
        total = sum(per.values())
        print(f"\nthe replica's CPU with no request, {elapsed:.0f} s: {total:.1f} ms a second\n")
        print(markdown_table(["thread", "CPU ms/s"], rows))
        result = {"seconds": elapsed, "cpu_ms_per_s": total, "threads": {r[0]: float(r[1]) for r in rows}}
        if args.strace > 0 and shutil.which("strace"):
            counts = strace(manager.pid, args.strace, "-c")
            waits = [line for line in strace(manager.pid, args.strace, "-e", "trace=epoll_pwait,epoll_wait").splitlines()
                     if "epoll_" in line and "resumed" not in line]
            sleeping = [w for w in waits if not re.search(r", \d+, 0, ", w)]
            calls = collections.Counter({m.group(2): int(m.group(1)) for m in re.finditer(
                r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$", counts, re.M) if m.group(2) != "total"})
            print(f"\nsystem calls of the replica's threads in {args.strace:.0f} s (strace -c -f): "
                  f"{sum(calls.values()):,}; the event loops' waits {len(waits) / args.strace:.1f} a second, "
                  f"of which sleeps (a timeout not 0: a wakeup each) {len(sleeping) / args.strace:.1f}\n")
            print(markdown_table(["system call", "calls"], [[k, f"{v:,}"] for k, v in calls.most_common()]))
            result.update(syscalls=dict(calls), loop_waits_per_s=len(waits) / args.strace,
                          loop_sleeps_per_s=len(sleeping) / args.strace)
        print("\n" + load_line(load0))
        write_json("idle_replica", {"params": vars(args), **result, "loadavg_at_start": load0})
    finally:
        manager.stop()
        remove_containers(docker_client(), mid)
        stop_process(redis_proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
