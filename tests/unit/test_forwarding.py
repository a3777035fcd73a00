"""What crosses the proxy besides the body (manager/proxy/forwarding.py): pure header logic; the real
proxy is driven by tests/test_console.py with a hostile node."""

from __future__ import annotations

import msgspec

from manager.proxy.forwarding import HeaderRules
from shared.config import Config, deep_merge


def config(**over: object) -> Config:
    base = {"engine": {"docker": {"creation_kwargs": {"image": "x"}}}, "admin": {"token": "admin-tok"},
            "cluster": {"internal_token": "internal-tok"}, "client_auth": {"api_keys": ["client-key"]}}
    return msgspec.convert(deep_merge(base, over), Config)


RULES = HeaderRules(config())


def test_no_credential_of_the_managers_reaches_a_node() -> None:
    for auth in (b"Bearer admin-tok", b"bearer  internal-tok ", b"client-key", b"Basic client-key"):
        assert RULES.to_node([(b"authorization", auth)]) == [], auth
    kept = [(b"authorization", b"Bearer the-nodes-own"), (b"x-other", b"admin-tok")]
    assert RULES.to_node(kept) == kept
    got = RULES.to_node([(b"cookie", b"node_id=n; tsm_console=c; tsm_api_key=k;theirs=1")])
    assert got == [(b"cookie", b"node_id=n;theirs=1")]
    assert RULES.to_node([(b"cookie", b"tsm_console=c; tsm_api_key=k")]) == []
    assert RULES.to_node([(b"cookie", b"a=1; b=2")]) == [(b"cookie", b"a=1; b=2")]  # untouched


def test_a_node_sets_no_cookie_of_the_managers_and_its_page_is_sandboxed() -> None:
    got = RULES.from_node([(b"set-cookie", b"node_id=x; Path=/"), (b"set-cookie", b" tsm_console=x"),
                           (b"set-cookie", b"tsm_api_key=x; HttpOnly"), (b"set-cookie", b"Node_ID=x"),
                           (b"x-content-type-options", b"sniff"), (b"content-type", b"text/html")])
    assert got == [(b"set-cookie", b"Node_ID=x"), (b"content-type", b"text/html"),  # another name: theirs
                   (b"content-security-policy", b"sandbox"), (b"x-content-type-options", b"nosniff")]
    loose = HeaderRules(config(proxy={"response_csp": ""}))
    assert loose.from_node([]) == [(b"x-content-type-options", b"nosniff")]
