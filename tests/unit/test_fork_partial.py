"""A fork that fails for one copy answers which copies exist and leaves nothing of the failed one
(node operations on the in-memory engine and the real test Redis)."""

from __future__ import annotations

from typing import Any

import pytest

from nodeops import forks, lifecycle
from shared.engines.base import NewNode
from shared.errors import EngineError, ForkIncomplete
from shared.models import NodeStatus
from tests.unit.test_fake_engine import NO_TIERS, MakeOps, engine, make_ops  # noqa: F401  (the fixture)


async def test_a_fork_failing_for_one_copy_names_those_made(make_ops: MakeOps) -> None:  # noqa: F811
    ops = await make_ops(node=NO_TIERS)
    src = await lifecycle.create_node(ops)
    fake = engine(ops)
    real_create = fake.create
    calls = {"n": 0}

    async def create(node: NewNode) -> str:
        if node.seed:
            calls["n"] += 1
            if calls["n"] == 2:  # the second copy's container cannot be made
                raise EngineError("fake: out of something")
        return await real_create(node)

    fake.create = create  # type: ignore[method-assign]
    with pytest.raises(ForkIncomplete) as err:
        await forks.fork(ops, src.id, 3)
    made: list[Any] = err.value.extra["sessions"]
    assert len(made) == 2 and src.id not in made
    assert "2 of 3 copies made" in err.value.detail and "out of something" in err.value.detail
    for i in made:
        rec = await ops.store.get_node(i)
        assert rec is not None and rec.status == NodeStatus.RUNNING and rec.client == src.client
    # the failed copy left no record, container, workspace or quota slot; the saved copy is dropped
    assert sorted(await ops.store.manager_node_ids(ops.manager_id)) == sorted([src.id, *made])
    assert {n.session for n in await ops.backend.nodes(ops.manager_id)} == {src.id, *made}
    assert {w.session_id for w in await ops.backend.workspaces(ops.manager_id)} == {src.id, *made}
    assert fake.saved == {}
