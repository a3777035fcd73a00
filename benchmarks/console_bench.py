"""The operator console in headless Chromium: how fast it reflects the cluster.

One replica; Debian's chromium driven by Playwright, logged in, on the sessions view. N times
(default 8): a client's ``POST /get_cookie``, then the time until the page lists the session
(counted from get_cookie's answer: the page learns of it from the events stream, usually while
the node is still starting), then the client's ``/release_session`` and the time until the row
is gone. Also: the login-to-first-draw time and the bytes the page loads.

    .venv/bin/python -m benchmarks.console_bench [--n 8]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import httpx
from playwright.sync_api import sync_playwright

from benchmarks._support import one_manager
from benchmarks.common import command_line, fmt, load_line, markdown_table, summarize, write_json

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.console_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=8, help="sessions created and released (default 8)")
    args = p.parse_args(argv)
    print(f"$ {command_line()}", flush=True)
    load0 = os.getloadavg()
    appear: list[float] = []
    gone: list[float] = []
    created: list[float] = []
    loaded: dict[str, int] = {}
    with one_manager("console") as run:
        m, token = run.m, run.m.cfg["admin"]["token"]
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
            page = browser.new_page()
            page.on("response", lambda resp: loaded.__setitem__(resp.url, len(resp.body()))
                    if resp.url.startswith(m.console_url + "/ui/") and resp.status == 200 and "/ui/api/" not in resp.url
                    else None)
            page.goto(m.console_url + "/ui/")  # the console has a port of its own
            page.fill("#token", token)
            t0 = time.monotonic()
            page.click("#login-form button[type=submit]")
            page.wait_for_selector("#cluster td")
            first_draw = time.monotonic() - t0
            page.goto(m.console_url + "/ui/#/sessions")
            page.wait_for_selector("#sessions:not([hidden])")
            for _ in range(args.n):
                c = httpx.Client(base_url=m.url, timeout=60)
                t0 = time.monotonic()
                resp = c.post("/get_cookie")
                if resp.status_code != 200:
                    raise RuntimeError(f"/get_cookie answered {resp.status_code}: {resp.text[:300]}")
                t1 = time.monotonic()
                node_id = c.cookies["node_id"]
                page.wait_for_selector(f'a[data-node="{node_id}"]', timeout=10000)
                t2 = time.monotonic()
                resp = c.post("/release_session")
                if resp.status_code != 200:
                    raise RuntimeError(f"/release_session answered {resp.status_code}: {resp.text[:300]}")
                t3 = time.monotonic()
                page.wait_for_selector(f'a[data-node="{node_id}"]', state="detached", timeout=10000)
                created.append(t1 - t0)
                appear.append(t2 - t1)
                gone.append(time.monotonic() - t3)
            browser.close()
    removed, deleted = run.removed, run.deleted

    rows = []
    for name, values in (("get_cookie (for scale)", created), ("listed after get_cookie answered", appear),
                         ("gone after release_session answered", gone)):
        s = summarize(values)
        rows.append([name, s["n"], fmt(s["p50_ms"]), fmt(s["p90_ms"]), fmt(max(values) * 1000)])
    print(f"\nConsole, sessions view, {args.n} sessions created and released by a client\n")
    print(markdown_table(["what", "n", "p50 ms", "p90 ms", "max ms"], rows))
    total = sum(loaded.values())
    print(f"\nlogin to the cluster view drawn: {first_draw * 1000:.0f} ms; the page loaded {len(loaded)} files, "
          f"{total / 1000:.0f} kB (uncompressed)")
    print(f"cleanup: {removed} container(s) removed, {deleted} key(s) deleted")
    path = write_json("console_bench", {"loadavg_at_start": load0, "params": {**vars(args), "manager_id": run.mid},
                                        "get_cookie_s": created, "appear_s": appear, "gone_s": gone,
                                        "first_draw_s": first_draw, "files": loaded,
                                        "cleanup": {"containers_removed": removed, "keys_deleted": deleted}})
    print(load_line(load0))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
