"""Placement as a pure function: spread by load or this replica's own first; full and draining skipped."""

from __future__ import annotations

from nodeops.placement import rank


def test_spread_takes_the_least_loaded_and_its_own_among_equals() -> None:
    live = {"a", "b", "c"}
    assert rank("a", "spread", live, {"a": 3, "b": 1, "c": 2}, {}, set()) == ["b", "c", "a"]
    assert rank("b", "spread", live, {"a": 1, "b": 1, "c": 1}, {}, set()) == ["b", "a", "c"]
    assert rank("a", "spread", live, {}, {}, set())[0] == "a"  # none yet: no hop


def test_local_takes_its_own_first_then_the_least_loaded() -> None:
    assert rank("a", "local", {"a", "b", "c"}, {"a": 5, "b": 2, "c": 1}, {}, set()) == ["a", "c", "b"]


def test_full_and_draining_engines_are_skipped_either_way() -> None:
    live = {"a", "b", "c"}
    counts = {"a": 2, "b": 0, "c": 1}
    caps = {"a": 2, "b": 4, "c": 4}
    for policy in ("spread", "local"):
        assert rank("a", policy, live, counts, caps, set()) == ["b", "c"]  # a is full
        assert rank("a", policy, live, counts, caps, {"b"}) == ["c"]
        assert rank("a", policy, live, counts, {"a": 2, "b": 0, "c": 1}, {"b"}) == []
    # a cap of 0 is none
    assert rank("a", "spread", {"a"}, {"a": 10_000}, {"a": 0}, set()) == ["a"]


def test_only_live_manager_ids_and_its_own_are_candidates() -> None:
    assert rank("a", "spread", {"b"}, {"a": 9, "b": 3, "gone": 0}, {}, set()) == ["b", "a"]
