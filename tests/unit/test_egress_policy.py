"""The egress policy model: validation (400 with a message, nothing half-taken) and name matching."""

from __future__ import annotations

import pytest

from shared.egress.policy import name_allowed, validate
from shared.errors import BadRequest


def test_a_policy_is_normalized() -> None:
    pol = validate({"default": "deny", "allow": ["API.Example.com.", "*.pypi.org", "203.0.113.7", "198.51.100.9/24"],
                    "deny": ["evil.example.com"]})
    assert pol.allow == ["api.example.com", "*.pypi.org", "203.0.113.7/32", "198.51.100.0/24"]
    assert pol.deny == ["evil.example.com"]


@pytest.mark.parametrize("raw, says", [
    ({"default": "maybe"}, "default must be one of"),
    ({"allow": ["not a name"]}, "neither an address range nor a name"),
    ({"allow": ["localhost"]}, "neither an address range nor a name"),
    ({"allow": ["1.2.3.4.5"]}, "looks like an address"),
    ({"allow": [""]}, "empty rule"),
    ({"allow": ["169.254.169.254"]}, "platform deny set"),
    ({"allow": ["127.0.0.1/32"]}, "platform deny set"),
    ({"allow": "example.com"}, "egress policy"),
    ({"allow": ["a.example.com"], "extra": 1}, "egress policy"),
    ({"allow": [f"h{i}.example.com" for i in range(300)]}, "at most"),
])
def test_bad_policies_are_refused_naming_the_fault(raw: object, says: str) -> None:
    with pytest.raises(BadRequest) as err:
        validate(raw)
    assert says in err.value.detail


def test_a_range_wider_than_the_platform_set_is_taken_and_carved_out_later() -> None:
    assert validate({"allow": ["0.0.0.0/0"]}).allow == ["0.0.0.0/0"]


def test_names_match_exactly_or_below_a_wildcard_and_deny_wins() -> None:
    pol = validate({"default": "deny", "allow": ["api.example.com", "*.example.org"], "deny": ["bad.example.org"]})
    assert name_allowed(pol, "API.example.com.") == (True, "api.example.com")
    assert name_allowed(pol, "x.api.example.com") == (False, "")
    assert name_allowed(pol, "a.b.example.org") == (True, "*.example.org")
    assert name_allowed(pol, "example.org") == (False, "")  # the wildcard is below the name only
    assert name_allowed(pol, "notexample.org") == (False, "")
    assert name_allowed(pol, "bad.example.org") == (False, "bad.example.org")
    assert name_allowed(validate({}), "anything.example.net") == (True, "")
