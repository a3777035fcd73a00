"""Per-phase timing of one operation, without threading a timer through every call.

``timing()`` opens a record for the current task (and the tasks it spawns: they copy the
context, and share the dict); ``phase(name)`` anywhere below, the backend included, adds its
elapsed time to that record, and does nothing when none is open.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_current: ContextVar[dict[str, float] | None] = ContextVar("tsm_phases", default=None)


@contextmanager
def timing() -> Iterator[dict[str, float]]:
    """Collect the phases timed inside the block into the dict it yields (phase -> seconds)."""
    record: dict[str, float] = {}
    token = _current.set(record)
    try:
        yield record
    finally:
        _current.reset(token)


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Add the block's duration to the open record under name (summed if it runs twice)."""
    record = _current.get()
    if record is None:
        yield
        return
    t0 = time.perf_counter()
    try:
        yield
    finally:
        record[name] = record.get(name, 0.0) + time.perf_counter() - t0


def add(name: str, seconds: float) -> None:
    """Add a duration measured elsewhere (a wait that ended before the record opened)."""
    record = _current.get()
    if record is not None:
        record[name] = record.get(name, 0.0) + seconds


def describe(record: dict[str, float]) -> str:
    """The record as a log field: phase:ms pairs in the order they ran."""
    return ",".join(f"{k}:{v * 1000:.0f}" for k, v in record.items())
