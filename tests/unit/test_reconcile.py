"""The reconcile plan as a pure function: every branch of desired vs actual."""

from __future__ import annotations

from checker.reconcile import Limits, plan
from shared.engines.base import NodeInfo, WorkspaceInfo
from shared.models import NodeRecord

NOW = 1_000_000.0
LIMITS = Limits(idle_seconds=600, idle_grace_seconds=60, exited_gc_seconds=3600, stuck_creation_seconds=120)


def rec(i: str, **kw: object) -> NodeRecord:
    base = dict(id=i, manager_id="m", status="running", created_at=NOW - 1000, ready_at=NOW - 900,
                host="127.0.0.1", port=1000)
    base.update(kw)
    return NodeRecord(**base)  # type: ignore[arg-type]


def cont(i: str, status: str = "running", **kw: object) -> NodeInfo:
    base = dict(id=i, owner="m", role="node", status=status, health="none", created=NOW - 1000,
                host="127.0.0.1", port=1000)
    base.update(kw)
    return NodeInfo(**base)  # type: ignore[arg-type]


def run(records, containers, last=None, members=None, limits=LIMITS, **kw):  # type: ignore[no-untyped-def]
    """last: node id -> last request time; cut to what the range query returns."""
    floor = limits.smallest_idle()
    idle = {i: t for i, t in (last or {}).items() if floor is not None and NOW - t > floor}
    return plan("m", members or [r.id for r in records], records, containers, idle, NOW, limits, **kw)


def test_record_without_container_is_forgotten() -> None:
    p = run([rec("a")], [])
    assert [r.id for r in p.forget] == ["a"]


def test_status_health_and_port_are_updated_field_by_field() -> None:
    p = run([rec("a", health="healthy")], [cont("a", "exited", port=0, health="unhealthy")], {"a": NOW})
    assert p.updates["a"]["status"] == "exited"
    assert p.updates["a"]["health"] == "unhealthy"
    assert "port" not in p.updates["a"]  # an exited container publishes no port: keep the old one
    p = run([rec("b")], [cont("b", port=2000)], {"b": NOW})
    assert p.updates["b"] == {"port": "2000"}


def test_creating_record_is_left_to_its_flow_until_stuck() -> None:
    young = rec("a", status="creating", ready_at=0, created_at=NOW - 10)
    assert not run([young], [cont("a")]).updates
    old = rec("b", status="creating", ready_at=0, created_at=NOW - 500)
    assert [(r.id, why) for r, why in run([old], [cont("b")]).remove] == [("b", "stuck in creation")]


def test_creation_seen_before_its_start_stays_creating_and_is_removed_when_stuck() -> None:
    young = rec("a", status="creating", ready_at=0, created_at=NOW - 10)
    assert not run([young], [cont("a", "created", port=0)]).updates  # not "created": it would never be stuck
    old = rec("b", status="creating", ready_at=0, created_at=NOW - 500)
    assert [why for _, why in run([old], [cont("b", "created", port=0)]).remove] == ["stuck in creation"]


def test_idle_nodes_are_stopped_after_grace() -> None:
    p = run([rec("a"), rec("b")], [cont("a"), cont("b")], {"a": NOW - 601, "b": NOW - 10})
    assert [r.id for r in p.idle_stop] == ["a"]
    fresh = rec("c", ready_at=NOW - 30)  # restarted 30 s ago: inside the grace period
    assert not run([fresh], [cont("c")], {"c": NOW - 9999}).idle_stop


def test_exited_nodes_are_collected_after_gc_time() -> None:
    old = rec("a", status="exited", stopped_at=NOW - 4000, ready_at=0)
    new = rec("b", status="exited", stopped_at=NOW - 10, ready_at=0)
    p = run([old, new], [cont("a", "exited"), cont("b", "exited")])
    assert [r.id for r, _ in p.remove] == ["a"]


def test_released_record_is_removed_again() -> None:
    p = run([rec("a", status="released")], [cont("a")])
    assert [(r.id, why) for r, why in p.remove] == [("a", "released")]


def test_containers_without_record_are_adopted_or_removed() -> None:
    p = run([], [cont("run", port=3000), cont("ex", "exited"), cont("new", "created", created=NOW - 5),
                 cont("stale", "created", created=NOW - 500), cont("t", role="test"),
                 cont("young", created=NOW - 1)])  # may be mid-creation: its record is on the way
    adopted = {r.id: r for r in p.adopt}
    assert set(adopted) == {"run", "ex"}
    assert adopted["run"].port == 3000 and adopted["run"].ready_at == NOW
    assert adopted["ex"].status == "exited"
    assert p.remove_orphans == ["stale"]


def test_stale_reservations_are_dropped() -> None:
    p = run([], [], members=[f"pending:{NOW - 500}:x", f"pending:{NOW - 1}:y"])
    assert p.stale_reservations == [f"pending:{NOW - 500}:x"]


def test_undelivered_pool_claim_is_released() -> None:
    p = run([rec("a", role="claiming", claimed_at=NOW - 60)], [cont("a")])
    assert p.remove and p.remove[0][1].startswith("claimed")


def test_pooled_node_age_runs_from_ready_not_from_creation() -> None:
    """A creation that took longer than the pool's maximum age must not recycle the node it just made."""
    limits = Limits(idle_seconds=600, idle_grace_seconds=60, exited_gc_seconds=3600, stuck_creation_seconds=120,
                    pool_max_age_seconds=4)
    young = rec("a", role="pooled", created_at=NOW - 7, ready_at=NOW - 1)
    old = rec("b", role="pooled", created_at=NOW - 7, ready_at=NOW - 5)
    p = run([young, old], [cont("a"), cont("b")], limits=limits)
    assert [(r.id, why) for r, why in p.remove] == [("b", "pooled node past its maximum age")]


def test_unwatched_nodes_are_stopped_when_configured() -> None:
    limits = Limits(idle_seconds=600, idle_grace_seconds=0, exited_gc_seconds=3600, stuck_creation_seconds=120,
                    unwatched_seconds=30)
    recs = [rec("a"), rec("b"), rec("c")]
    p = plan("m", ["a", "b", "c"], recs, [cont("a"), cont("b"), cont("c")], {}, NOW,
             limits, {"a": NOW - 31, "b": NOW - 5})
    assert [r.id for r in p.idle_stop] == ["a"]


def test_a_new_address_on_the_node_network_is_recorded() -> None:
    """An unpublished node may get another address when it is restarted behind our back."""
    p = run([rec("a", host="172.18.0.2", port=31942)], [cont("a", host="172.18.0.5", port=31942)])
    assert p.updates == {"a": {"host": "172.18.0.5"}}
    p = run([rec("a", host="172.18.0.2", port=31942)], [cont("a", status="exited", host="127.0.0.1", port=0)])
    assert "host" not in p.updates.get("a", {})


TIERS = Limits(idle_seconds=600, idle_grace_seconds=0, exited_gc_seconds=3600, stuck_creation_seconds=120,
               pause_seconds=60, archive_seconds=3600, delete_seconds=None)


def session(i: str, **kw: object) -> NodeRecord:
    return rec(i, **{"container_id": f"c-{i}", "workspace": f"ws-{i}", **kw})


def sc(i: str, status: str = "running", **kw: object) -> NodeInfo:
    return cont(f"c-{i}", status, session_id=i, workspace=f"ws-{i}", **kw)


def test_each_tier_is_entered_at_its_own_threshold() -> None:
    recs = [session("run"), session("pause"), session("stop"), session("arch"),
            session("arch2", status="exited", ready_at=0), session("paused", status="paused")]
    cs = [sc("run"), sc("pause"), sc("stop"), sc("arch"), sc("arch2", "exited"), sc("paused", "paused")]
    last = {"run": NOW - 10, "pause": NOW - 61, "stop": NOW - 601, "arch": NOW - 3601, "arch2": NOW - 3601,
            "paused": NOW - 601}
    p = run(recs, cs, last, limits=TIERS)
    assert [r.id for r in p.pause] == ["pause"]
    assert {r.id for r in p.idle_stop} == {"stop", "paused"}  # a paused node is stopped in its turn
    assert {r.id for r in p.archive} == {"arch", "arch2"}
    assert not p.expire and not p.remove


def test_tiers_turned_off_are_skipped() -> None:
    off = Limits(idle_seconds=None, idle_grace_seconds=0, exited_gc_seconds=3600, stuck_creation_seconds=120,
                 pause_seconds=None, archive_seconds=None)
    p = run([session("a")], [sc("a")], {"a": NOW - 10**6}, limits=off)
    assert not (p.pause or p.idle_stop or p.archive or p.expire)


def test_retention_deletes_archived_sessions_only_when_set() -> None:
    kept = run([session("a", status="archived", container_id="")], [], {"a": NOW - 10**7}, limits=TIERS)
    assert not kept.expire and not kept.forget and not kept.lost
    ret = Limits(**{**TIERS.__dict__, "delete_seconds": 86400})
    gone = run([session("a", status="archived", container_id="")], [], {"a": NOW - 10**7}, limits=ret)
    assert [r.id for r in gone.expire] == ["a"]


def test_a_session_whose_container_vanished_is_archived_not_forgotten() -> None:
    p = run([session("a"), rec("legacy")], [], limits=TIERS)
    assert [r.id for r in p.lost] == ["a"]
    assert [r.id for r in p.forget] == ["legacy"]  # no workspace of its own: nothing to come back to


def test_a_replaced_container_is_found_by_its_session_label() -> None:
    p = run([session("a", status="archived", container_id="")], [cont("new", "running", session_id="a",
                                                                      workspace="ws-a", port=5)], limits=TIERS)
    assert p.updates["a"]["container_id"] == "new" and p.updates["a"]["status"] == "running"
    dup = run([session("a")], [sc("a"), cont("other", session_id="a", workspace="ws-a")], limits=TIERS)
    assert dup.duplicates == ["other"]


def test_creations_of_a_dead_replica_are_removed_not_adopted() -> None:
    young = session("a", status="creating", ready_at=0, created_at=NOW - 1, replica_id="dead")
    alive = session("b", status="creating", ready_at=0, created_at=NOW - 1, replica_id="alive")
    p = run([young, alive], [sc("a"), sc("b")], limits=TIERS, live_replicas={"alive"})
    assert [(r.id, why) for r, why in p.remove] == [("a", "its creating replica died")]
    claimed = session("c", role="claiming", claimed_at=NOW - 1, claimed_by="dead")
    assert run([claimed], [sc("c")], limits=TIERS, live_replicas={"alive"}).remove
    member = f"pending:{NOW - 1:.3f}:x:dead"
    assert run([], [], members=[member], limits=TIERS, live_replicas={"alive"}).stale_reservations == [member]


def test_workspaces_are_restored_on_rebuild_and_collected_later() -> None:
    ws = [WorkspaceInfo(name="ws-x", session_id="x", owner="m", role="node", replica_id="r", created=NOW - 100),
          WorkspaceInfo(name="ws-a", session_id="a", owner="m", role="node", replica_id="r", created=NOW - 100),
          WorkspaceInfo(name="ws-new", session_id="n", owner="m", role="node", replica_id="r", created=NOW - 1)]
    p = run([session("a")], [sc("a")], limits=TIERS, workspaces=ws, rebuild=True)
    assert [(r.id, r.status, r.workspace) for r in p.restore] == [("x", "archived", "ws-x")]
    later = run([session("a")], [sc("a")], limits=TIERS, workspaces=ws)
    assert not later.restore and not later.orphan_workspaces and set(later.orphans_seen) == {"ws-x"}
    seen = {"ws-x": NOW - TIERS.orphan_workspace_grace_seconds}
    assert run([session("a")], [sc("a")], limits=TIERS, workspaces=ws, orphans_seen=seen).orphan_workspaces == ["ws-x"]


def test_containers_of_sessions_are_adopted_under_the_session_id() -> None:
    p = run([], [sc("s", "paused", port=7)], limits=TIERS)
    assert [(r.id, r.container_id, r.workspace, r.status) for r in p.adopt] == [("s", "c-s", "ws-s", "paused")]
