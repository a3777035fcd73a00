"""The heartbeat writes the replica's entry before it asks the engine anything."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from manager.replica import registry


class Store:
    def __init__(self) -> None:
        self.beats: list[float] = []

    async def draining(self) -> set[str]:
        return set()

    async def heartbeat(self, replica: Any, ttl: float) -> None:
        self.beats.append(asyncio.get_running_loop().time())


async def test_a_slow_engine_does_not_hold_the_entry_back(monkeypatch: pytest.MonkeyPatch) -> None:
    engine_answered = asyncio.Event()

    async def slow_node_cap(rt: Any) -> int:
        await asyncio.sleep(0.5)  # an engine slower than the entry's TTL, scaled down
        engine_answered.set()
        return 7

    monkeypatch.setattr(registry.capacity, "node_cap", slow_node_cap)
    store = Store()
    rt: Any = SimpleNamespace(stopping=False, manager_id="m", store=store, registry_lock=asyncio.Lock(),
                              replica=SimpleNamespace(node_cap=-1, draining=False))
    beat = asyncio.create_task(registry._beat(rt, ttl=0.2, ask_engine=True))
    await asyncio.sleep(0.1)
    # the entry is written while the engine is still thinking
    assert store.beats and not engine_answered.is_set()
    await beat
    assert rt.replica.node_cap == 7
