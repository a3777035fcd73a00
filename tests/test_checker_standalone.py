"""`toolserver-checker` (checker/main.py) run alone, as the README offers for deployments that keep
the checker apart from the managers: replicas with no built-in monitor serve sessions, and the
standalone process takes the lease of their manager_id, reconciles the engine with Redis and
stops idle nodes; on SIGTERM it hands the lease back and exits 0."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import docker
import httpx
import redis
import yaml

from tests.conftest import ROOT, base_config, wait_for

CHECKER = str(ROOT / ".venv/bin/toolserver-checker")


def test_the_standalone_checker_takes_the_lease_reconciles_and_stops_idle_nodes(
        start_manager, docker_client: docker.DockerClient, redis_client: redis.Redis, prefix: str,  # type: ignore[no-untyped-def]
        manager_id: str, tmp_path: Path) -> None:
    node = {"idling_close_minutes": 0.05, "idle_grace_seconds": 0}
    checker = {"interval_seconds": 0.5, "lease_ttl_seconds": 3}
    m = start_manager(builtin_monitor=False, node=node, checker=checker)
    a = httpx.Client(base_url=m.url, timeout=60)
    assert a.post("/get_cookie").status_code == 200
    a_id = a.cookies["node_id"]
    b = httpx.Client(base_url=m.url, timeout=60)
    assert b.post("/get_cookie").status_code == 200
    b_id = b.cookies["node_id"]
    lease = f"{prefix}:mgr:{manager_id}:lease"
    assert not redis_client.exists(lease)  # the manager runs no checker of its own

    cfg = base_config(prefix, manager_id, node=node, checker=checker, replica_id="standalone-checker")
    path = tmp_path / "checker.yml"
    path.write_text(yaml.safe_dump(cfg))
    log = tmp_path / "checker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([CHECKER, "--config", str(path)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: (redis_client.get(lease) or b"").startswith(b"standalone-checker:"), timeout=15,
                 what=f"the standalone checker holding the lease (log: {log.read_text()[-2000:]})")
        # reconcile: a container removed behind the managers' back, its session archived
        docker_client.containers.get(b_id).remove(force=True)
        wait_for(lambda: redis_client.hget(f"{prefix}:node:{b_id}", "status") == b"archived", timeout=15,
                 what="the session of a gone container archived by the standalone checker")
        # idle for 3 s: stopped by it; the next proxied call through the manager brings it back
        wait_for(lambda: redis_client.hget(f"{prefix}:node:{a_id}", "status") == b"exited", timeout=20,
                 what="idle stop by the standalone checker")
        assert docker_client.containers.get(a_id).status == "exited"
        assert a.post("/").json() == {"message": "Hello World"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
        assert not redis_client.exists(lease)  # handed back at once, not left to expire
        assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert a.post("/release_session").status_code == 200
    assert b.post("/release_session").status_code == 200
