from manager.replica import activity
from manager.replica.activity import UNKNOWN_LIMIT, AddressCache
from shared.models import NodeRecord


def test_an_unknown_id_is_remembered_briefly_and_forgotten_when_created() -> None:
    cache = AddressCache(30.0, unknown_ttl=60.0)
    cache.put_unknown("a" * 64)
    assert cache.is_unknown("a" * 64) and not cache.is_unknown("b" * 64)
    cache.invalidate("a" * 64)  # what the id's "created" or "adopted" event does on every replica
    assert not cache.is_unknown("a" * 64)
    cache.put_unknown("c" * 64)
    cache.clear()  # events were missed (Redis away): nothing remembered is trusted
    assert not cache.is_unknown("c" * 64)


def test_unknown_ids_expire_and_are_bounded(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    now = [1000.0]
    monkeypatch.setattr(activity.time, "monotonic", lambda: now[0])
    cache = AddressCache(30.0, unknown_ttl=2.0)
    cache.put_unknown("d" * 64)
    now[0] += 1.9
    assert cache.is_unknown("d" * 64)
    now[0] += 0.2
    assert not cache.is_unknown("d" * 64)
    cache = AddressCache(30.0, unknown_ttl=60.0)
    for i in range(UNKNOWN_LIMIT + 10):
        cache.put_unknown(f"{i:064x}")
    assert not cache.is_unknown(f"{0:064x}") and cache.is_unknown(f"{UNKNOWN_LIMIT + 9:064x}")
    assert len(cache._unknown) == UNKNOWN_LIMIT
    off = AddressCache(30.0, unknown_ttl=0)
    off.put_unknown("e" * 64)
    assert not off.is_unknown("e" * 64)


def test_the_last_record_outlives_expiry_and_events_but_not_redis_saying_unknown() -> None:
    cache = AddressCache(0.0)  # every entry expired at once
    rec = NodeRecord(id="e" * 64, short_id="e", manager_id="m")
    cache.put(rec)
    assert cache.get(rec.id) is None and cache.last_known(rec.id) is rec
    cache.invalidate(rec.id)  # an event
    cache.clear()  # events missed while Redis was away
    assert cache.last_known(rec.id) is rec  # what a call goes on with while Redis is still away
    cache.put_unknown(rec.id)  # Redis said it has no such session: nothing is kept to go on with
    assert cache.last_known(rec.id) is None
