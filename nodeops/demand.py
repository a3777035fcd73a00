"""How big the warm pool should be: the recent arrival rate of creations, as plain arithmetic.

Every replica counts each creation request of its manager_id in Redis; the checker reads that
count once a pass and keeps an exponentially weighted rate. The pool then holds what that rate
asks for over ``pool.demand_seconds`` (at least one creation's time: what arrives while a
refill runs), within ``pool.size`` .. ``pool.max_size`` and the room the engine's cap leaves.
"""

from __future__ import annotations

import math
import time
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


@dataclass(frozen=True)
class PoolPlan:
    """What the pool should be now."""

    target: int  # ready pooled nodes to keep
    refill_concurrency: int  # pooled nodes to create at once while below target


def plan(cfg: PoolConfig, rate: float, start_seconds: float, room: int | None) -> PoolPlan:
    """The pool's target and refill concurrency for an arrival rate (per second), the time one
    creation takes, and the nodes the engine's cap still has room for (None: no cap)."""
    lo, hi = max(cfg.size, 0), max(cfg.size, cfg.max_size, 0)
    # rounded, not ceiled: a rate decaying towards 0 must reach a target of 0 in finite time
    want = math.floor(rate * max(cfg.demand_seconds, start_seconds) + 0.5)
    target = min(max(lo, want), hi)
    if room is not None:
        target = min(target, max(room, 0))
    # what arrives while one node starts, made in parallel; one at a time when nobody is asking
    conc = min(max(1, math.ceil(rate * start_seconds - 1e-9)), max(cfg.refill_concurrency, 1))
    return PoolPlan(target=target, refill_concurrency=conc)
