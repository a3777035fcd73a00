"""Activity as work in progress, on a store that records what it is asked to flush."""

from __future__ import annotations

import asyncio

from manager.replica.activity import ActivityRecorder


class Flushed:
    def __init__(self) -> None:
        self.batches: list[dict[str, tuple[str, float]]] = []

    async def touch(self, batch: dict[str, tuple[str, float]]) -> None:
        self.batches.append(dict(batch))


def test_work_in_progress_is_flushed_until_it_ends() -> None:
    store = Flushed()
    rec = ActivityRecorder(store, 1.0)  # type: ignore[arg-type]

    async def go() -> None:
        rec.begin("a", "m")  # a request in flight
        rec.begin("a", "m")  # and an open socket
        await rec.flush()
        await rec.flush()  # nothing new happened, but "a" is still busy: flushed again, as now
        rec.end("a")
        assert rec.busy("a")
        await rec.flush()
        rec.end("a")  # the last one ends: its end is the start of the idle time
        assert not rec.busy("a")
        await rec.flush()
        await rec.flush()  # idle: nothing more to write

    asyncio.run(go())
    assert [sorted(b) for b in store.batches] == [["a"], ["a"], ["a"], ["a"]]
    times = [b["a"][1] for b in store.batches]
    assert times == sorted(times)


def test_first_work_on_a_quiet_node_wakes_the_flush() -> None:
    rec = ActivityRecorder(Flushed(), 1.0)  # type: ignore[arg-type]
    rec.begin("a", "m")
    assert rec._wake.is_set()
    rec._wake.clear()
    rec.end("a")
    rec.begin("a", "m")  # still not flushed: it goes out early too
    assert rec._wake.is_set()
    rec._wake.clear()
    asyncio.run(rec.flush())
    rec.end("a")
    rec.begin("a", "m")  # flushed a moment ago: the next regular flush is soon enough
    assert not rec._wake.is_set()
