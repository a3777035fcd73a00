"""The replica's uvicorn server loop (manager/main.py _Server): once a second when idle, not ten
times (issue 26, an idle replica's wakeups), and a stop still ends it at once."""

from __future__ import annotations

import signal
import threading
import time
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import pytest
import uvicorn

from manager import main
from testing.harness import free_port
from tests.conftest import wait_for


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


class Counted(main._Server):
    ticks = 0

    async def on_tick(self, counter: int) -> bool:
        self.ticks += 1
        return await super().on_tick(counter)


def _serve() -> tuple[Counted, threading.Thread, str]:
    port = free_port()
    server = Counted(uvicorn.Config(_app, host="127.0.0.1", port=port, log_config=None, lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started or not thread.is_alive(), timeout=60, interval=0.02, what="the server to start")
    assert server.started, "the server's thread ended before it started"
    return server, thread, f"http://127.0.0.1:{port}"


def test_an_idle_server_ticks_once_a_second_and_keeps_its_date() -> None:
    server, thread, url = _serve()
    try:
        t0, ticks0 = time.monotonic(), server.ticks
        time.sleep(3.0)  # the window is the measure: a loaded machine only ticks less
        ticks, elapsed = server.ticks - ticks0, time.monotonic() - t0
        # uvicorn's own loop ticks ten times a second (30 here)
        assert ticks <= elapsed / main.TICK_SECONDS + 2, f"{ticks} ticks in {elapsed:.1f} s"
        # the Date header still follows the clock: a tick's, so it moves on (a frozen one never would)
        def date() -> float:
            return parsedate_to_datetime(httpx.get(url).headers["date"]).timestamp()

        first = date()
        wait_for(lambda: date() > first, timeout=60, interval=0.2, what="the Date header to move on")
    finally:
        server.handle_exit(signal.SIGTERM, None)
        thread.join(30)


def test_a_stop_ends_a_server_waiting_for_its_next_tick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(main, "TICK_SECONDS", 3600.0)  # a stop that waited for the tick would wait an hour
    server, thread, _ = _serve()
    server.handle_exit(signal.SIGTERM, None)
    thread.join(30)  # the bound, against milliseconds: without the wake the loop sleeps its hour
    assert not thread.is_alive(), "the server still runs after its stop"
