"""One owner's container events from one engine, as one long-lived stream (NodeBackend.changes).

One events request per feed, held open while nothing happens: the engine writes only when a
container of the owner changes, so an idle feed costs no CPU and no wakeup. It is closed from the
stopping side (close() shuts its socket down, which ends the blocked read at once), and opened again
only when it breaks (the engine restarted, the connection dropped), from the last event's time on:
the engine replays what it still holds from then (its last 256 events), so an event of the gap is
not lost, and the feed says None first, since what changed while the engine was away needs a full
look. The reader before it opened a request every second to see its stop flag, a sixth of an idle
replica's CPU (issue 26).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from typing import Any

from shared.engines.base import Changes
from shared.engines.docker.client import make_client
from shared.engines.docker.labels import owner_filter

log = logging.getLogger(__name__)

RETRY_SECONDS = 1.0  # at most one open this often: a broken stream or an engine away is tried again


def _since(nanos: int) -> str:
    """The engine's form of a time for since=: seconds.nanoseconds."""
    return f"{nanos // 1_000_000_000}.{nanos % 1_000_000_000:09d}"


def _opened_at(stream: Any) -> str | None:
    """Where a stream began, in the engine's clock (its answer's Date, to the second): the since of a
    reopen when no event came, so the gap is replayed even then (a second more is only a wake more)."""
    with contextlib.suppress(Exception):  # the SDK's response object; no Date: the local clock
        return str(int(parsedate_to_datetime(stream._response.headers["Date"]).timestamp()))
    return str(int(time.time()))


class EventFeed(Changes):
    """The container events of owner on the engine at host ("": DOCKER_HOST or the local socket)."""

    def __init__(self, host: str, owner: str) -> None:
        self.host = host
        self.owner = owner
        self._filters = {"type": "container", "label": owner_filter(owner)}
        self._lock = threading.Lock()  # orders close() against an open in progress
        self._closed = threading.Event()
        self._stream: Any = None
        self._since: str | None = None  # the last event's time (or the stream's start): a reopen's since
        self.opens = 0  # events requests made: one for as long as nothing breaks

    def __iter__(self) -> Iterator[str | None]:
        next_open = 0.0
        while not self._closed.wait(max(0.0, next_open - time.monotonic())):
            next_open = time.monotonic() + RETRY_SECONDS
            # a client per stream: a broken connection is never handed to the next request
            client = make_client(self.host, None)
            stream = None
            try:
                try:
                    stream = client.api.events(since=self._since, filters=self._filters, decode=True)
                except Exception as exc:  # the engine away (stopped, restarting): tried again, quietly
                    log.debug("engine_events_open_failed owner=%s error=%r", self.owner, exc)
                    continue
                self.opens += 1
                with self._lock:
                    if self._closed.is_set():
                        return
                    self._stream = stream
                if self._since is None:
                    self._since = _opened_at(stream)
                log.info("engine_events_following owner=%s since=%s", self.owner, self._since)
                yield None
                try:
                    for ev in stream:
                        nanos = ev.get("timeNano")
                        if isinstance(nanos, int):
                            self._since = _since(nanos)  # at or after: the last one comes again, a wake more
                        yield str(ev.get("id") or (ev.get("Actor") or {}).get("ID") or "") or None
                except Exception as exc:  # a broken read the SDK does not end quietly: reopened too
                    log.debug("engine_events_read_failed owner=%s error=%r", self.owner, exc)
                if not self._closed.is_set():
                    log.info("engine_events_broken owner=%s reopening_since=%s", self.owner, self._since)
            finally:
                with self._lock:
                    self._stream = None
                if stream is not None:
                    with contextlib.suppress(Exception):
                        stream._response.close()
                with contextlib.suppress(Exception):
                    client.close()

    def close(self) -> None:
        """End the iteration from any thread: the open stream's socket is shut down, so the blocked read
        returns now rather than at the next event."""
        with self._lock:
            self._closed.set()
            stream = self._stream
        if stream is not None:
            with contextlib.suppress(Exception):  # already closed by its reader
                stream.close()
