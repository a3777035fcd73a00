"""Client API keys: which routes want one, and that a node never receives it."""

import pytest

from manager.admin.ratelimit import FailureLimiter
from manager.edge.client_auth import ClientIds, ClientKeys
from shared.config import QuotaConfig
from shared.errors import InvalidNode, TooManyFailures

KEYS = ClientKeys(["alpha", "beta"], "X-API-Key", "tsm_api_key")


def scope(path: str, *headers: tuple[bytes, bytes]) -> dict:  # type: ignore[type-arg]
    return {"type": "http", "path": path, "headers": list(headers)}


def test_open_and_own_token_routes_need_no_key() -> None:
    for path in ("/alive", "/ready", "/metrics", "/internal/nodes", "/admin/nodes"):
        assert KEYS.allowed(scope(path))
    assert not KEYS.allowed(scope("/get_cookie"))
    assert not KEYS.allowed(scope("/execute_tool", (b"x-api-key", b"alph")))
    assert KEYS.allowed(scope("/execute_tool", (b"x-api-key", b"beta")))
    assert KEYS.allowed(scope("/execute_tool", (b"cookie", b"node_id=abc; tsm_api_key=alpha")))
    assert not KEYS.allowed(scope("/execute_tool", (b"cookie", b"node_id=abc; other=alpha")))
    assert not ClientKeys([], "X-API-Key", "c")  # off without keys


def test_own_token_routes_are_whole_path_segments() -> None:
    for path in ("/ui", "/ui/", "/ui/api/nodes", "/admin", "/internal/nodes"):
        assert KEYS.allowed(scope(path)), path
    # a node path that merely starts with the same letters is a node path: it wants the key
    for path in ("/uix", "/ui_state", "/administer", "/admins/x", "/internals"):
        assert not KEYS.allowed(scope(path)), path


def test_the_key_is_stripped_before_the_node() -> None:
    out = KEYS.strip([(b"x-api-key", b"alpha"), (b"cookie", b"node_id=abc; tsm_api_key=alpha"),
                      (b"content-type", b"application/json")])
    assert out == [(b"cookie", b"node_id=abc"), (b"content-type", b"application/json")]
    assert KEYS.strip([(b"cookie", b"tsm_api_key=alpha")]) == []


def test_a_client_is_its_key_hash_however_it_comes_never_the_key() -> None:
    ids = ClientIds(KEYS, QuotaConfig())
    by_header = ids.of(scope("/get_cookie", (b"x-api-key", b"alpha")))
    by_cookie = ids.of(scope("/get_cookie", (b"cookie", b"tsm_api_key=alpha")))
    assert by_header == by_cookie and by_header.startswith("key:") and "alpha" not in by_header
    assert ids.of(scope("/get_cookie", (b"x-api-key", b"beta"))) != by_header
    KEYS.check_bound(by_header, scope("/x", (b"cookie", b"tsm_api_key=alpha")), "n")
    with pytest.raises(InvalidNode):
        KEYS.check_bound(by_header, scope("/x", (b"x-api-key", b"beta")), "n")
    KEYS.check_bound("addr:1.2.3.4", scope("/x", (b"x-api-key", b"beta")), "n")  # made without a key


def test_anonymous_clients_are_their_address_and_only_trusted_proxies_name_another() -> None:
    def at(peer: str, *headers: tuple[bytes, bytes]) -> dict:  # type: ignore[type-arg]
        return {**scope("/get_cookie", *headers), "client": (peer, 5000)}

    plain = ClientIds(ClientKeys([], "X-API-Key", "c"), QuotaConfig())
    assert plain.of(at("10.0.0.9", (b"x-forwarded-for", b"1.1.1.1"))) == "addr:10.0.0.9"  # not trusted
    hdr = ClientIds(ClientKeys([], "X-API-Key", "c"), QuotaConfig(client_header="X-Team"))
    assert hdr.of(at("10.0.0.9", (b"x-team", b"blue"))).startswith("hdr:")
    lb = ClientIds(ClientKeys([], "X-API-Key", "c"), QuotaConfig(trusted_proxies=["10.0.0.0/24"]))
    assert lb.of(at("10.0.0.9", (b"x-forwarded-for", b"6.6.6.6, 1.1.1.1, 10.0.0.3"))) == "addr:1.1.1.1"
    assert lb.of(at("10.0.0.9")) == "addr:10.0.0.9"
    assert lb.of(at("7.7.7.7", (b"x-forwarded-for", b"1.1.1.1"))) == "addr:7.7.7.7"


def test_failed_tokens_block_an_address_for_the_rest_of_the_window() -> None:
    lim = FailureLimiter(3, 60)
    for i in range(3):
        lim.check("a", now=100 + i)
        lim.failed("a", now=100 + i)
    with pytest.raises(TooManyFailures) as exc:
        lim.check("a", now=130)
    assert exc.value.retry_after == 30
    lim.check("b", now=130)  # another address is not affected
    lim.check("a", now=160)  # the window ended
    lim.failed("a", now=160)
    lim.check("a", now=161)
