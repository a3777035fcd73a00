#!/usr/bin/env python3
"""Cold-start benchmark of the node image; prints a markdown table.

Measured, over N runs each (default 10):
  (a) inside one running container: ``python3 -m app`` spawned on a spare port, from spawn to the
      first accepted TCP connection (pure process start-to-listening, no Docker involved); plus the
      same process's own figure (imports + bind) as it logs it;
  (b) Docker SDK ``containers.create`` + ``start`` to the first HTTP 200 on the published
      127.0.0.1 port (what a client of the manager waits for), with create/start split out;
  (c) ``container.stop(timeout=5)`` of an idle node (SIGTERM handling).
Every container is labelled toolserver-manager.manager_id=bench-node-startup and removed.

Usage: .venv/bin/python -m benchmarks.node_startup [--runs 10] [--image toolserver-node:latest]
"""

import argparse
import http.client
import statistics
import sys
import time
import uuid

from benchmarks.common import BENCH_NODE_HEADERS, BENCH_NODE_SECRET

LABELS = {"toolserver-manager.manager_id": "bench-node-startup", "toolserver-manager.role": "bench"}
PORT = 31942

# Runs inside the container: spawn the node on a spare port and time until it accepts connections.
IN_CONTAINER = r"""
import json, os, socket, subprocess, sys, time
out = []
for i in range(int(sys.argv[1])):
    env = dict(os.environ, NODE_PORT="31943", NODE_HOST="127.0.0.1")
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, "-m", "app"], env=env, cwd="/opt/toolserver-node",
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while True:
        s = socket.socket()
        try:
            s.connect(("127.0.0.1", 31943))
            break
        except OSError:
            time.sleep(0.0005)
        finally:
            s.close()
    listen = (time.monotonic() - t0) * 1000
    p.terminate()
    err = p.communicate(timeout=10)[1].decode(errors="replace")
    own = None
    for line in err.splitlines():
        if "ms after process start" in line:
            own = float(line.rsplit("listening ", 1)[1].split(" ms")[0])
    out.append([listen, own])
print(json.dumps(out))
"""


def stats(values):
    values = [v for v in values if v is not None]
    if not values:
        return "n/a", "n/a", "n/a"
    return (f"{statistics.median(values):.0f}", f"{min(values):.0f}", f"{max(values):.0f}")


def first_200(port: int, timeout: float = 20.0) -> float:
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        try:
            conn.request("GET", "/", headers=BENCH_NODE_HEADERS)
            if conn.getresponse().status == 200:
                return time.monotonic()
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()
        time.sleep(0.005)
    raise TimeoutError(f"no HTTP 200 on 127.0.0.1:{port} within {timeout} s")


def cleanup(client) -> None:
    flt = {"label": [f"{k}={v}" for k, v in LABELS.items()]}
    for c in client.containers.list(all=True, filters=flt):
        try:
            c.remove(force=True)
        except Exception:
            pass


def main() -> int:
    import docker

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--image", default="toolserver-node:latest")
    args = ap.parse_args()

    client = docker.from_env(timeout=120)
    image = client.images.get(args.image)
    size_mb = image.attrs["Size"] / 1e6
    cleanup(client)
    run_kw = dict(labels=LABELS, environment={"NODE_SECRET": BENCH_NODE_SECRET}, ports={f"{PORT}/tcp": ("127.0.0.1", None)}, init=True,
                  read_only=True, tmpfs={"/tmp": "rw,exec,nosuid,size=64m",
                                         "/app/workspace": "rw,exec,uid=1000,gid=1000,size=64m"})
    try:
        # (a) inside one container
        c = client.containers.run(args.image, detach=True, name=f"bench-node-{uuid.uuid4().hex[:8]}", **run_kw)
        try:
            c.reload()
            first_200(int(c.ports[f"{PORT}/tcp"][0]["HostPort"]))
            import json

            res = c.exec_run(["python3", "-c", IN_CONTAINER, str(args.runs)])
            if res.exit_code != 0:
                raise RuntimeError(res.output.decode(errors="replace"))
            inside = json.loads(res.output.decode().strip().splitlines()[-1])
        finally:
            c.remove(force=True)

        # (b) create + start -> first 200, (c) stop
        create_ms, start_ms, total_ms, stop_ms, logged_ms = [], [], [], [], []
        for _ in range(args.runs):
            t0 = time.monotonic()
            c = client.containers.create(args.image, detach=True,
                                         name=f"bench-node-{uuid.uuid4().hex[:8]}", **run_kw)
            t1 = time.monotonic()
            try:
                c.start()
                t2 = time.monotonic()
                c.reload()
                t3 = first_200(int(c.ports[f"{PORT}/tcp"][0]["HostPort"]))
                create_ms.append((t1 - t0) * 1000)
                start_ms.append((t2 - t1) * 1000)
                total_ms.append((t3 - t0) * 1000)
                t4 = time.monotonic()
                c.stop(timeout=5)
                stop_ms.append((time.monotonic() - t4) * 1000)
                for line in c.logs().decode(errors="replace").splitlines():
                    if "ms after process start" in line:
                        logged_ms.append(float(line.rsplit("listening ", 1)[1].split(" ms")[0]))
            finally:
                c.remove(force=True)
    finally:
        cleanup(client)

    rows = [
        ("(a) process start → listening, inside the container (spawn → TCP accept)",
         stats([r[0] for r in inside])),
        ("(a) same, as the node logs it (/proc start time, 10 ms resolution)",
         stats([r[1] for r in inside])),
        ("(b) SDK create + start → first HTTP 200 on 127.0.0.1:<published>", stats(total_ms)),
        ("(b) of which `containers.create`", stats(create_ms)),
        ("(b) of which `container.start`", stats(start_ms)),
        ("(b) node's own log: container PID start → listening", stats(logged_ms)),
        ("(c) `container.stop(timeout=5)` of an idle node (SIGTERM → exit)", stats(stop_ms)),
    ]
    print(f"Image `{args.image}`: **{size_mb:.1f} MB**; {args.runs} runs each; times in ms.\n")
    print("| measurement | median | min | max |")
    print("|---|---:|---:|---:|")
    for name, (med, lo, hi) in rows:
        print(f"| {name} | {med} | {lo} | {hi} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
