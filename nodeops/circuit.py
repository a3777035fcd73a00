"""A circuit per host address: once a host did not answer a connection, calls to anything
on it fail at once instead of each waiting out a connect timeout.

Closed: calls go through. Open (after a connect timed out, or the host or its network was
unreachable): calls fail in microseconds with HostUnreachable naming the host, and a probe
connects to the host every ``probe_seconds``; a host that answers (even with a refusal: the
host is up, only that port is not) closes the circuit, so the first call after the host
returns goes through. After ``retry_seconds`` one real call is also let through (half-open)
whatever the probe says. A refused connection never opens it: the host answered.
Per process, in memory: it costs the hot path one dict lookup when nothing is open.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from shared import metrics
from shared.errors import HostUnreachable

log = logging.getLogger(__name__)

# errors that say the host (not a port on it) cannot be reached
UNREACHABLE_ERRNOS = frozenset({errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT, errno.EHOSTDOWN,
                                errno.ENETDOWN})


def host_unreachable_error(exc: BaseException | None) -> bool:
    """Whether a connect failure means the host itself is unreachable (not just a closed port)."""
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return True
    return isinstance(exc, OSError) and exc.errno in UNREACHABLE_ERRNOS


@dataclass
class _Open:
    since: float
    why: str
    port: int
    owner: str  # the manager_id whose node or replica was being reached, for the message
    retry_at: float
    probe: asyncio.Task[None] | None = None


class Circuits:
    """The circuits of one process, by host address."""

    def __init__(self, retry_seconds: float = 5.0, probe_seconds: float = 0.5) -> None:
        self.retry_seconds = retry_seconds
        self.probe_seconds = probe_seconds
        self._open: dict[str, _Open] = {}
        self.on_open: list[Callable[[str, str], None]] = []  # (host, why): e.g. abort requests in flight

    def check(self, host: str) -> None:
        """Raise HostUnreachable at once while the host's circuit is open (one call per retry_seconds
        goes through as a probe)."""
        state = self._open.get(host)
        if state is None:
            return
        now = time.monotonic()
        if now >= state.retry_at:
            state.retry_at = now + self.retry_seconds  # this call is the half-open probe
            return
        metrics.CIRCUIT_REJECTED.inc()
        raise HostUnreachable(host, state.owner, f"{state.why}; since {now - state.since:.1f} s")

    def is_open(self, host: str) -> bool:
        return host in self._open

    def failure(self, host: str, port: int, owner: str, why: str) -> None:
        """A connection to host failed as an unreachable host's does: open its circuit."""
        if host in self._open:
            self._open[host].retry_at = time.monotonic() + self.retry_seconds
            return
        now = time.monotonic()
        state = _Open(since=now, why=why, port=port, owner=owner, retry_at=now + self.retry_seconds)
        self._open[host] = state
        metrics.CIRCUIT_OPEN.set(len(self._open))
        metrics.CIRCUIT_TRANSITIONS.labels("open").inc()
        log.warning("host_unreachable host=%s manager_id=%s reason=%r", host, owner, why)
        with contextlib.suppress(RuntimeError):  # no running loop: no probe (unit tests of the logic)
            state.probe = asyncio.get_running_loop().create_task(self._probe(host, state), name=f"probe-{host}")
        for fn in self.on_open:
            fn(host, why)

    def success(self, host: str) -> None:
        """The host answered: close its circuit."""
        state = self._open.pop(host, None)
        if state is None:
            return
        if state.probe is not None and state.probe is not asyncio.current_task():
            state.probe.cancel()
        metrics.CIRCUIT_OPEN.set(len(self._open))
        metrics.CIRCUIT_TRANSITIONS.labels("closed").inc()
        log.info("host_reachable host=%s manager_id=%s down_s=%.2f", host, state.owner,
                 time.monotonic() - state.since)

    async def _probe(self, host: str, state: _Open) -> None:
        loop = asyncio.get_running_loop()
        while self._open.get(host) is state:
            t0 = loop.time()
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, state.port), self.probe_seconds)
                writer.close()
            except (TimeoutError, OSError) as exc:
                if host_unreachable_error(exc):
                    # one attempt per probe_seconds: a timed-out one has already waited that long
                    await asyncio.sleep(max(0.0, self.probe_seconds - (loop.time() - t0)))
                    continue
            if self._open.get(host) is state:
                self.success(host)
            return

    def close(self) -> None:
        for state in self._open.values():
            if state.probe is not None:
                state.probe.cancel()
        self._open.clear()
