"""Client API keys: which routes want one, and that a node never receives it."""

from manager.client_auth import ClientKeys

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


def test_the_key_is_stripped_before_the_node() -> None:
    out = KEYS.strip([(b"x-api-key", b"alpha"), (b"cookie", b"node_id=abc; tsm_api_key=alpha"),
                      (b"content-type", b"application/json")])
    assert out == [(b"cookie", b"node_id=abc"), (b"content-type", b"application/json")]
    assert KEYS.strip([(b"cookie", b"tsm_api_key=alpha")]) == []
