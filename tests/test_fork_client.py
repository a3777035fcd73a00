"""Forks and snapshots from the Python client (sync wrapper over the async one) and from
``toolserver-admin``, against a real manager, Redis and Docker."""

from __future__ import annotations

import json

from tests.conftest import ADMIN_TOKEN
from tests.test_cli import admin, ok
from tests.test_fork import WS
from tests.test_snapshots import no_seed_left  # noqa: F401  (an autouse fixture)
from toolserver_manager import Admin, Session, SnapshotInfo


def out(s: Session, command: str) -> str:
    r = s.execute_tool("shell_command_executor", {"command": command})
    return str(r.output["data"]["display"]).strip().removeprefix("stdout:").strip()


def test_fork_and_snapshot_from_the_client_and_the_cli(start_manager) -> None:
    m = start_manager()
    with Session(m.url) as src:
        out(src, f"echo prepared > {WS}/env.txt")
        copies = src.fork(2)
        try:
            assert len(copies) == 2 and len({c.node_id for c in copies} | {src.node_id}) == 3
            for c in copies:
                assert out(c, f"cat {WS}/env.txt") == "prepared"
            out(copies[0], f"echo mine > {WS}/env.txt")
            assert out(copies[1], f"cat {WS}/env.txt") == "prepared"
        finally:
            for c in copies:
                c.__exit__(None, None, None)  # released, as their source's on_exit says

        snap = src.snapshot("client-snap")
        assert isinstance(snap, SnapshotInfo) and snap.name == "client-snap" and snap.source == src.node_id
        assert [s.name for s in src.snapshots()] == ["client-snap"]
        with Session(m.url, snapshot="client-snap") as new:
            assert new.node_id not in (src.node_id, None)
            assert out(new, f"cat {WS}/env.txt") == "prepared"

        # the admin CLI: fork by id, snapshot, list, delete
        forked = json.loads(ok(admin("fork", str(src.node_id), "--count", "1", "--json", url=m.url)))
        assert forked["source"] == src.node_id and len(forked["sessions"]) == 1
        ok(admin("snapshot", str(src.node_id), "cli-snap", url=m.url))
        listed = json.loads(ok(admin("snapshots", "--json", url=m.url)))["snapshots"]
        assert sorted(s["name"] for s in listed) == ["cli-snap", "client-snap"]
        again = admin("snapshot", str(src.node_id), "cli-snap", url=m.url)
        assert again.returncode == 1 and "exists" in again.stderr
        assert "deleted" in ok(admin("delete-snapshot", "cli-snap", url=m.url))
        src.delete_snapshot("client-snap")
        with Admin(m.url, ADMIN_TOKEN) as a:
            assert a.snapshots() == []
            assert a.release_nodes(*forked["sessions"]) == {forked["sessions"][0]: "released"}


def test_the_admin_says_whose_snapshot_from_the_cli_and_the_client(start_manager) -> None:
    """Two clients each keep "base": the CLI and Admin delete one only once told whose."""
    import httpx

    m = start_manager(quota={"client_header": "X-Client"})
    for who in ("alice", "bob"):
        s = httpx.Client(base_url=m.url, timeout=120, headers={"X-Client": who})
        assert s.post("/get_cookie").status_code == 200
        assert s.post("/snapshot_session", json={"name": "base"}).status_code == 200, who
    listed = json.loads(ok(admin("snapshots", "--json", url=m.url)))["snapshots"]
    assert [s["name"] for s in listed] == ["base", "base"]
    first, second = (s["client"] for s in listed)
    which = admin("delete-snapshot", "base", url=m.url)
    assert which.returncode == 1 and "?client=" in which.stderr  # 409: several keep it
    assert "deleted" in ok(admin("delete-snapshot", "base", "--client", first, url=m.url))
    with Admin(m.url, ADMIN_TOKEN) as a:
        assert [s.client for s in a.snapshots()] == [second]
        a.delete_snapshot("base", client=second)
        assert a.snapshots() == []
