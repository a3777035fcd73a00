"""How big the warm pool should be: the recent arrival rate of creations, as plain arithmetic.

Every replica counts each creation request of its manager_id in Redis; the checker reads that
count once a pass and keeps an exponentially weighted rate. The pool then holds what that rate
asks for over ``pool.demand_seconds`` (at least one creation's time: what arrives while a
refill runs), within ``pool.size`` .. ``pool.max_size`` and the room the engine's cap leaves.

A rate smooths a burst away: 100 creations at one instant, averaged over a 10 s half-life, ask
for a few pooled nodes, and the rate has decayed before a refill has made them. So the pool also
holds the largest burst seen over ``pool.burst_memory_seconds``: the most arrivals within one
creation's time (what no refill can meet once it has begun), so the next such burst is met from
the pool where the host can hold it.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from shared.config import PoolConfig


class ArrivalRate:
    """Arrivals per second from a growing counter, smoothed with a half-life (an EWMA in time)."""

    def __init__(self, half_life_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.half_life = max(half_life_seconds, 1e-3)
        self.clock = clock
        self.rate = 0.0
        self._last: tuple[float, int] | None = None

    def update(self, total: int) -> float:
        """Take the counter's value now; the smoothed rate."""
        now = self.clock()
        if self._last is None:  # the first reading only sets the origin: no time has passed yet
            self._last = (now, total)
            return self.rate
        t_last, n_last = self._last
        dt = now - t_last
        if dt <= 0:
            return self.rate
        # a counter that went back (Redis lost it) restarts from its new value: no negative arrivals
        sample = max(total - n_last, 0) / dt
        alpha = 1 - 0.5 ** (dt / self.half_life)
        self.rate += alpha * (sample - self.rate)
        self._last = (now, total)
        return self.rate


class BurstPeak:
    """The most arrivals within one creation's time seen over the recent memory, from a growing
    counter read once a pass."""

    def __init__(self, memory_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.memory = max(memory_seconds, 0.0)
        self.clock = clock
        self.peak = 0
        self._last: int | None = None
        self._recent: deque[tuple[float, int]] = deque()  # (when, arrivals since the pass before)
        self._sums: deque[tuple[float, int]] = deque()  # (when, arrivals within a window ending then)

    def update(self, total: int, window_seconds: float) -> int:
        """Take the counter's value now and the time one creation takes; the peak."""
        now = self.clock()
        if self._last is None or self.memory <= 0:  # the first reading only sets the origin
            self._last = total
            return self.peak
        # a counter that went back (Redis lost it) restarts from its new value: no negative arrivals
        delta, self._last = max(total - self._last, 0), total
        self._recent.append((now, delta))
        while self._recent and self._recent[0][0] <= now - window_seconds and len(self._recent) > 1:
            self._recent.popleft()  # the newest pass's arrivals always count, however long it was
        within = sum(d for _, d in self._recent)
        # the window sums kept are a decreasing sequence (a larger newer one makes older ones moot)
        while self._sums and self._sums[-1][1] <= within:
            self._sums.pop()
        self._sums.append((now, within))
        while self._sums[0][0] < now - self.memory:
            self._sums.popleft()
        self.peak = self._sums[0][1]
        return self.peak


@dataclass(frozen=True)
class PoolPlan:
    """What the pool should be now."""

    target: int  # ready pooled nodes to keep
    refill_concurrency: int  # pooled nodes to create at once while below target


def plan(cfg: PoolConfig, rate: float, start_seconds: float, room: int | None, peak: int = 0) -> PoolPlan:
    """The pool's target and refill concurrency for an arrival rate (per second), the time one
    creation takes, the nodes the engine's cap still has room for (None: no cap) and the largest
    recent burst (BurstPeak)."""
    lo, hi = max(cfg.size, 0), max(cfg.size, cfg.max_size, 0)
    # rounded, not ceiled: a rate decaying towards 0 must reach a target of 0 in finite time
    by_rate = math.floor(rate * max(cfg.demand_seconds, start_seconds) + 0.5)
    want = max(by_rate, peak)
    target = min(max(lo, want), hi)
    if room is not None:
        target = min(target, max(room, 0))
    # what arrives while one node starts, made in parallel; one at a time when nobody is asking
    conc = min(max(1, math.ceil(rate * start_seconds - 1e-9)), max(cfg.refill_concurrency, 1))
    if peak > by_rate:  # a burst's worth to make while the rate is low: as fast as refills may
        conc = max(cfg.refill_concurrency, 1)
    return PoolPlan(target=target, refill_concurrency=conc)
