"""The console's login cookie and Origin rule: pure logic (the browser tests drive them for real)."""

from __future__ import annotations

from types import SimpleNamespace

from manager.console.routes import cookie_valid, issue_cookie, origin_allowed, parse_cookie


def test_cookie_holds_no_token_and_expires() -> None:
    value, expires = issue_cookie("s3cret-token", minutes=10, now=1000.0)
    assert "s3cret-token" not in value and expires == 1600
    assert cookie_valid("s3cret-token", value, now=1599)
    assert not cookie_valid("s3cret-token", value, now=1600)  # expired
    assert not cookie_valid("another-token", value, now=1001)  # the token changed: every login ends


def test_cookie_cannot_be_extended_or_forged() -> None:
    value, _ = issue_cookie("tok", minutes=10, now=1000.0)
    exp, login_id, sig = value.split(".")
    assert not cookie_valid("tok", f"{int(exp) + 3600}.{login_id}.{sig}", now=1001)
    assert not cookie_valid("tok", f"{exp}.{'0' * 32}.{sig}", now=1001)  # another login's id
    for bad in ("", ".", "x.y", f"{exp}.", f"{exp}.{login_id}.", f"{exp}.{login_id}.{'0' * 64}", sig,
                f"{exp}.{sig}", None):
        assert not cookie_valid("tok", bad, now=1001)
    assert not cookie_valid("", value, now=1001)


def test_each_login_has_its_own_id_to_revoke() -> None:
    a, b = issue_cookie("tok", minutes=10, now=1000.0)[0], issue_cookie("tok", minutes=10, now=1000.0)[0]
    got_a, got_b = parse_cookie("tok", a, now=1001), parse_cookie("tok", b, now=1001)
    assert got_a and got_b and got_a[0] == got_b[0] == 1600 and got_a[1] != got_b[1]


def conn(origin: str | None, host: str = "127.0.0.1:8080") -> SimpleNamespace:
    headers = {"host": host} | ({"origin": origin} if origin is not None else {})
    return SimpleNamespace(headers=headers)


def test_origin_must_name_the_host_or_a_configured_origin() -> None:
    assert origin_allowed(conn("http://127.0.0.1:8080"), [])
    assert origin_allowed(conn("https://ops.example.com"), ["https://ops.example.com/"])
    for origin in (None, "null", "", "http://127.0.0.1:31942", "http://localhost:8080",
                   "http://127.0.0.1:8080.evil.com", "http://evil.com"):
        assert not origin_allowed(conn(origin), []), origin
    assert not origin_allowed(conn("http://127.0.0.1:8080", host=""), [])
