"""Per-session egress policies on the real manager, Redis and engine: who may set one, what is
refused (400, nothing changed), and that a change is stored and announced on the event stream."""

from __future__ import annotations

import json

import httpx
import redis

from tests.conftest import ADMIN_TOKEN

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
POLICY = {"default": "deny", "allow": ["api.example.com", "*.pypi.org", "203.0.113.0/24"], "deny": []}


def _events(redis_client: redis.Redis, prefix: str, node_id: str) -> list[dict[str, str]]:
    stream = next(k for k in redis_client.scan_iter(f"{prefix}*events*") if b"mcp" not in k)
    out = []
    for _id, fields in redis_client.xrange(stream):
        ev = json.loads(fields[b"e"])
        if ev["node_id"] == node_id and ev["type"] == "egress_policy":
            out.append(ev)
    return out


def test_a_session_policy_is_set_by_allowed_clients_and_admins(start_manager, redis_client: redis.Redis,
                                                               prefix: str) -> None:
    m = start_manager(egress={"default": {"default": "allow", "deny": ["tracker.example.net"]}})
    c = httpx.Client(base_url=m.url, timeout=60)
    assert c.post("/get_cookie").status_code == 200
    node_id = c.cookies["node_id"]
    # the configured default until someone sets one
    r = c.get("/egress_policy")
    assert r.status_code == 200, r.text
    assert r.json()["egress"] == {"default": "allow", "allow": [], "deny": ["tracker.example.net"]}
    # clients may not by default; an admin may
    r = c.put("/egress_policy", json=POLICY)
    assert r.status_code == 403 and "client_may_set" in r.json()["detail"]
    r = httpx.put(f"{m.url}/admin/nodes/{node_id}/egress", json=POLICY, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert c.get("/egress_policy").json()["egress"] == POLICY
    # the admin view of the session shows it
    detail = httpx.get(f"{m.url}/admin/nodes/{node_id}", headers=ADMIN).json()
    assert detail["record"]["egress"] == POLICY
    # bad input: 400 naming the fault, and the stored policy is unchanged
    for bad, says in (({"default": "deny", "allow": ["169.254.169.254"]}, "platform deny set"),
                      ({"default": "deny", "allow": ["no such thing"]}, "neither an address range"),
                      ({"default": "sometimes"}, "default must be one of")):
        r = httpx.put(f"{m.url}/admin/nodes/{node_id}/egress", json=bad, headers=ADMIN)
        assert r.status_code == 400 and says in r.json()["detail"], r.text
    r = httpx.put(f"{m.url}/admin/nodes/{node_id}/egress", content=b"{not json", headers=ADMIN)
    assert r.status_code == 400
    assert c.get("/egress_policy").json()["egress"] == POLICY
    # the change went out on the event stream, saying who made it
    evs = _events(redis_client, prefix, node_id)
    assert len(evs) == 1 and evs[0]["detail"].startswith("by=admin "), evs
    # an unknown session: 404
    r = httpx.put(f"{m.url}/admin/nodes/{'0' * 64}/egress", json=POLICY, headers=ADMIN)
    assert r.status_code == 404
    c.post("/release_session")


def test_a_client_gives_a_policy_at_creation_only_with_a_listed_key(start_manager, redis_client: redis.Redis,
                                                                    prefix: str) -> None:
    m = start_manager(client_auth={"api_keys": ["k-plain", "k-egress"]},
                      egress={"client_may_set": True, "policy_api_keys": ["k-egress"]})
    plain = httpx.Client(base_url=m.url, timeout=60, headers={"X-API-Key": "k-plain"})
    before = set(redis_client.scan_iter(f"{prefix}*node:*"))
    r = plain.post("/get_cookie", json={"egress": POLICY})
    assert r.status_code == 403 and "policy_api_keys" in r.json()["detail"]
    assert set(redis_client.scan_iter(f"{prefix}*node:*")) == before  # refused before anything was made
    # without an egress key the body is ignored as before (XAgent's clients send none)
    assert plain.post("/get_cookie", json={"other": 1}).status_code == 200
    assert plain.get("/egress_policy").json()["egress"]["default"] == "allow"
    assert plain.put("/egress_policy", json=POLICY).status_code == 403
    plain.post("/release_session")

    good = httpx.Client(base_url=m.url, timeout=60, headers={"X-API-Key": "k-egress"})
    r = good.post("/get_cookie", json={"egress": {"default": "deny", "allow": ["bad name!"]}})
    assert r.status_code == 400 and "bad name!" in r.json()["detail"]
    r = good.post("/get_cookie", json={"egress": POLICY})
    assert r.status_code == 200, r.text
    assert good.get("/egress_policy").json()["egress"] == POLICY
    r = good.put("/egress_policy", json={"default": "deny", "allow": ["files.example.com"]})
    assert r.status_code == 200, r.text
    assert good.get("/egress_policy").json()["egress"]["allow"] == ["files.example.com"]
    evs = _events(redis_client, prefix, good.cookies["node_id"])
    assert [e["detail"].split()[0] for e in evs] == ["by=client", "by=client"]
    # another key's client sees the session as unknown
    other = httpx.Client(base_url=m.url, timeout=60, headers={"X-API-Key": "k-plain"}, cookies={"node_id": good.cookies["node_id"]})
    assert other.get("/egress_policy").status_code in (403, 404)
    good.post("/release_session")
