"""Failed admin-token attempts (console login, admin bearer, the events socket's token) limited
per client address, so a token cannot be guessed at the speed of the network.

In memory, per replica: a guesser spread over N replicas gets N times the rate, still bounded;
nothing here costs a Redis round trip, so a flood of bad tokens cannot load the store either.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict

from starlette.requests import HTTPConnection

from shared.errors import TooManyFailures

MAX_TRACKED = 10000  # addresses remembered at once: the oldest forgotten first


class FailureLimiter:
    """At most ``limit`` failures per address in a window of ``window`` seconds; then every
    attempt from that address, right or wrong, is refused until the window ends."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._seen: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def check(self, addr: str, now: float | None = None) -> None:
        """Raise TooManyFailures (with its Retry-After) while addr is blocked."""
        if self.limit <= 0:
            return
        got = self._seen.get(addr)
        if got is None:
            return
        count, start = got
        now = time.monotonic() if now is None else now
        if now - start >= self.window:
            del self._seen[addr]
        elif count >= self.limit:
            raise TooManyFailures(f"too many failed token attempts from {addr}: try again later",
                                  math.ceil(start + self.window - now))

    def failed(self, addr: str, now: float | None = None) -> None:
        """One more failure from addr."""
        if self.limit <= 0:
            return
        now = time.monotonic() if now is None else now
        count, start = self._seen.pop(addr, (0, now))
        if now - start >= self.window:
            count, start = 0, now
        self._seen[addr] = (count + 1, start)
        while len(self._seen) > MAX_TRACKED:
            self._seen.popitem(last=False)


def limiter(conn: HTTPConnection) -> tuple[FailureLimiter, str]:
    """The app's limiter and this connection's client address (as quotas see it)."""
    state = conn.app.state
    lim = getattr(state, "token_failures", None)
    if lim is None:
        admin = state.rt.cfg.admin
        lim = state.token_failures = FailureLimiter(admin.token_failures_per_window, admin.token_failure_window_seconds)
    return lim, state.proxy.client_ids.address(conn.scope)
