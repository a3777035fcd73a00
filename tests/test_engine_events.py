"""The checker's engine-event feed (shared/engines/docker/events.py) on real engines: one events
request held open while nothing happens, ended at once by a close from another thread, and reopened
after a break (its engine restarted) from the last event on, so nothing that happened in the gap is
lost, even when the engine is still down at the first try."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import docker
import pytest

from shared.engines.docker.events import EventFeed
from testing.hosts import PrivateEngine
from tests.conftest import LABEL, NODE_IMAGE, wait_for

LOGGER = "shared.engines.docker.events"
ENGINE = "unix:///var/run/docker.sock"  # the machine's, as docker_client


class Follow:
    """A feed iterated in a thread of its own, what it yields kept in order."""

    def __init__(self, it: Iterator[str | None]) -> None:
        self.items: list[str | None] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(it,), name="follow", daemon=True)
        self.thread.start()

    def _run(self, it: Iterator[str | None]) -> None:
        try:
            for item in it:
                self.items.append(item)
        except BaseException as exc:  # the test says what ended it
            self.error = exc

    def saw(self, item: str | None, after: int = 0) -> bool:
        if self.error is not None:
            raise AssertionError(f"the feed ended with {self.error!r}")
        return item in self.items[after:]


def next_within(it: Iterator[str | None], seconds: float) -> str | None:
    """The feed's next item, advanced in a thread so that a feed that never yields fails the test."""
    out: queue.Queue[tuple[str, Any]] = queue.Queue()

    def step() -> None:
        try:
            out.put(("item", next(it)))
        except BaseException as exc:
            out.put(("error", exc))

    threading.Thread(target=step, daemon=True).start()
    try:
        kind, value = out.get(timeout=seconds)
    except queue.Empty:
        raise AssertionError(f"the feed yielded nothing in {seconds:.0f} s") from None
    if kind == "error":
        raise AssertionError(f"the feed ended with {value!r}")
    return value  # type: ignore[no-any-return]


def until_seen(it: Iterator[str | None], want: str, seconds: float = 60.0) -> list[str | None]:
    """Advance the feed until it yields want; what it yielded on the way."""
    seen: list[str | None] = []
    deadline = time.monotonic() + seconds
    while want not in seen:
        seen.append(next_within(it, max(1.0, deadline - time.monotonic())))
    return seen


def made(client: docker.DockerClient, owner: str) -> str:
    """A container of owner's created (not started): one event, 'create'."""
    return str(client.api.create_container(NODE_IMAGE, labels={LABEL: owner})["Id"])


def test_an_idle_feed_holds_one_request(docker_client: docker.DockerClient, manager_id: str) -> None:
    feed = EventFeed(ENGINE, manager_id)
    follow = Follow(iter(feed))
    try:
        wait_for(lambda: follow.saw(None), what="the feed following")
        for _ in range(3):
            cid = made(docker_client, manager_id)
            wait_for(lambda: follow.saw(cid), what="the container's event")  # noqa: B023
            # idle between the events: a reader that reopens to look at a stop flag (the one before,
            # every second) has opened again by now; this one holds its first request
            time.sleep(1.5)
        assert feed.opens == 1, f"{feed.opens} events requests for one idle feed"
    finally:
        feed.close()
        follow.thread.join(30)


def test_a_close_ends_the_feed_thread_at_once(docker_client: docker.DockerClient, manager_id: str) -> None:
    feed = EventFeed(ENGINE, manager_id)
    follow = Follow(iter(feed))
    wait_for(lambda: follow.saw(None), what="the feed following")
    cid = made(docker_client, manager_id)
    wait_for(lambda: follow.saw(cid), what="the container's event")
    t0 = time.monotonic()
    feed.close()  # from this thread, while the feed's is blocked reading a silent stream
    # 30 s is the bound, against milliseconds measured: a close that left the read blocked would
    # wait for the owner's next event, which never comes
    follow.thread.join(30)
    assert not follow.thread.is_alive(), "the feed's thread still runs after close()"
    assert follow.error is None
    print(f"feed thread ended {1000 * (time.monotonic() - t0):.1f} ms after close()")


def test_a_broken_stream_reopens_without_losing_an_event(private_engine: PrivateEngine, manager_id: str,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    client = private_engine.client()
    feed = EventFeed(private_engine.docker_host, manager_id)
    it = iter(feed)
    follow: Follow | None = None
    try:
        assert next_within(it, 60) is None  # following
        a = made(client, manager_id)
        until_seen(it, a)

        # the engine restarts while the feed is not reading (this thread holds it between items):
        # its stream is broken, and b happens between the break and the reopen
        private_engine.stop_engine()
        private_engine.start_engine()
        b = made(client, manager_id)
        seen = until_seen(it, b)
        assert None in seen[: seen.index(b)], f"no 'look at everything' before the gap's events: {seen}"

        # the engine is still down when the feed tries again: it keeps trying, and what happens
        # once the engine is back (c) comes through
        private_engine.stop_engine()
        follow = Follow(it)
        wait_for(lambda: "engine_events_open_failed" in caplog.text, timeout=60,
                 what="the feed trying the stopped engine")
        private_engine.start_engine()
        c = made(client, manager_id)
        wait_for(lambda: follow.saw(c), timeout=60, what="the event after the engine came back")
    finally:
        feed.close()
        if follow is not None:
            follow.thread.join(30)
        client.close()
