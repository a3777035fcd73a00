from manager import activity
from manager.activity import UNKNOWN_LIMIT, AddressCache


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
