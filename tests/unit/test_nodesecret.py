from shared.models import NodeRecord
from shared.nodesecret import NodeSecrets


def test_derived_secrets_are_per_session_and_never_stored() -> None:
    s = NodeSecrets("k")
    a, b = s.new("a" * 64), s.new("b" * 64)
    assert a != b and len(a) == 43 and a == NodeSecrets("k").derive("a" * 64) != NodeSecrets("k2").derive("a" * 64)
    assert s.stored("a" * 64, a) == ""  # what Redis gets
    assert s.of(NodeRecord(id="a" * 64, short_id="a", manager_id="m", secret="")) == a


def test_a_clear_secret_of_an_older_record_is_kept_until_its_next_container() -> None:
    s = NodeSecrets("k")
    rec = NodeRecord(id="c" * 64, short_id="c", manager_id="m", secret="legacy")
    assert s.of(rec) == "legacy" and s.stored(rec.id, "legacy") == "legacy"
    assert s.new(rec.id, rec.secret) == s.derive(rec.id)  # the next container: derived


def test_without_a_key_secrets_are_random_and_kept() -> None:
    s = NodeSecrets()
    one = s.new("d" * 64)
    assert one != s.new("d" * 64) and s.stored("d" * 64, one) == one and s.new("d" * 64, one) == one
