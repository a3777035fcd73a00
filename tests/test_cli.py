"""``toolserver-admin`` run as a real subprocess against a real manager, Redis and Docker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ADMIN_TOKEN, ROOT, wait_for
from toolserver_manager import Session

ADMIN = ROOT / ".venv" / "bin" / "toolserver-admin"


def admin(*args: str, url: str = "", token: str | None = ADMIN_TOKEN, timeout: float = 30,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # the console script itself, as a user runs it: a missing entry point is a failure, not a fallback
    assert ADMIN.exists(), f"{ADMIN} missing: the package's toolserver-admin entry point was not installed"
    cmd = [str(ADMIN)]
    if url:
        cmd += ["--url", url]
    if token is not None:
        cmd += ["--token", token]
    base = {k: v for k, v in os.environ.items() if not k.startswith("TSM_")}
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout, cwd="/",
                          env={**base, **(env or {})})


def ok(p: subprocess.CompletedProcess[str]) -> str:
    assert p.returncode == 0, f"exit {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}"
    return p.stdout


def test_cli_against_a_manager(start_manager, manager_id: str) -> None:
    m = start_manager()
    s = Session.create(m.url, on_exit="keep")
    try:
        node_id = s.node_id
        assert node_id

        # nodes: a table for people, JSON for machines, filters passed through
        out = ok(admin("nodes", url=m.url))
        header, *rows = out.splitlines()
        assert header.split()[:4] == ["NODE", "MANAGER", "TIER", "STATUS"]
        assert any(r.startswith(node_id[:12]) and manager_id in r and "running" in r for r in rows)
        data = json.loads(ok(admin("nodes", "--json", "--manager-id", manager_id, "--status", "running", url=m.url)))
        assert data["total"] == 1 and data["nodes"][0]["id"] == node_id
        data = json.loads(ok(admin("--json", "nodes", "--status", "exited", "--manager-id", manager_id, url=m.url)))
        assert data["total"] == 0
        data = json.loads(ok(admin("nodes", "--json", "--min-idle-seconds", "3600", "--limit", "5", "--offset", "0",
                                   "--manager-id", manager_id, url=m.url)))
        assert data["nodes"] == [] and data["limit"] == 5
        bad = admin("nodes", "--status", "sleepy", url=m.url)
        assert bad.returncode == 1 and "400" in bad.stderr and "sleepy" in bad.stderr

        # inspect
        out = ok(admin("inspect", node_id, url=m.url))
        assert node_id in out and "running" in out
        detail = json.loads(ok(admin("inspect", node_id, "--json", url=m.url)))
        assert detail["record"]["id"] == node_id and detail["container"]["status"] == "running"
        assert detail["record"]["tier"] == "running" and detail["record"]["container_id"] == detail["container"]["id"]
        assert "tier" in out and "workspace" in out
        missing = admin("inspect", "0" * 64, url=m.url)
        assert missing.returncode == 1 and "404" in missing.stderr and missing.stdout == ""

        # replicas and leases (the built-in checker takes the lease within a moment)
        reps = json.loads(ok(admin("replicas", "--json", url=m.url)))["replicas"]
        assert any(r["replica_id"] == m.replica_id and r["manager_id"] == manager_id for r in reps)
        assert m.replica_id in ok(admin("replicas", url=m.url))

        def holder() -> bool:
            leases = json.loads(ok(admin("leases", "--json", url=m.url)))["leases"]
            return any(le["manager_id"] == manager_id and le["holder"] == m.replica_id for le in leases)

        wait_for(holder, timeout=10, what="the lease")
        out = ok(admin("leases", url=m.url))
        assert any(line.startswith(manager_id) and m.replica_id in line for line in out.splitlines())

        # engines, config (secrets redacted), drain on and off
        eng = json.loads(ok(admin("engines", "--json", url=m.url)))
        assert manager_id in eng["results"]
        assert manager_id in ok(admin("engines", url=m.url))
        cfg = json.loads(ok(admin("config", "--json", url=m.url)))
        assert cfg["manager_id"] == manager_id and cfg["admin"]["token"] == "***"
        assert ADMIN_TOKEN not in ok(admin("config", url=m.url))
        assert json.loads(ok(admin("drain", manager_id, "--json", url=m.url))) == {
            "manager_id": manager_id, "draining": True}
        assert "accepting" in ok(admin("drain", manager_id, "--off", url=m.url))

        # events: replay the stored history of this manager_id, stop after N
        out = ok(admin("events", "--manager-id", manager_id, "--last-event-id", "0", "--count", "2", "--json",
                       url=m.url))
        events = [json.loads(line) for line in out.splitlines()]
        assert len([e for e in events if e["event"] != "gap"]) == 2
        assert all(e["manager_id"] == manager_id for e in events if e["event"] != "gap")
        out = ok(admin("events", "--manager-id", manager_id, "--last-event-id", "0", "--count", "1", url=m.url))
        assert node_id[:12] in out

        # release, then the node is gone and releasing it again is an API error
        out = ok(admin("release", node_id, url=m.url))
        assert f"{node_id}  released" in out
        again = admin("release", node_id, url=m.url)
        assert again.returncode == 1 and node_id in again.stderr
        data = json.loads(ok(admin("nodes", "--json", "--manager-id", manager_id, url=m.url)))
        assert all(n["id"] != node_id or n["status"] == "released" for n in data["nodes"])

        # the environment supplies defaults for --url and --token
        ok(admin("replicas", token=None, env={"TSM_URL": m.url, "TSM_ADMIN_TOKEN": ADMIN_TOKEN}))
    finally:
        s.shutdown()


def test_cli_errors(start_manager) -> None:
    m = start_manager()
    bad = admin("nodes", url=m.url, token="wrong")
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.strip() == "toolserver-admin: error: 403 invalid admin token"
    none = admin("replicas", url=m.url, token=None)
    assert none.returncode == 1 and "401" in none.stderr and "TSM_ADMIN_TOKEN" in none.stderr
    ev = admin("events", "--count", "1", url=m.url, token="wrong")
    assert ev.returncode == 1 and "invalid admin token" in ev.stderr

    down = admin("nodes", url="http://127.0.0.1:1")
    assert down.returncode == 3 and "cannot connect" in down.stderr and len(down.stderr.splitlines()) == 1
    assert admin("events", url="http://127.0.0.1:1").returncode == 3

    assert admin(url=m.url).returncode == 2  # no command
    assert admin("nodes", "--limit", "0", url=m.url).returncode == 2
    assert admin("frobnicate", url=m.url).returncode == 2
    assert admin("release", url=m.url).returncode == 2
    assert "exit codes" in ok(admin("--help"))


def test_cli_module_help() -> None:
    p = subprocess.run([sys.executable, "-m", "toolserver_manager.cli", "nodes", "--help"], capture_output=True, text=True,
                       cwd=Path(ROOT), timeout=30)
    assert p.returncode == 0 and "--min-idle-seconds" in p.stdout
