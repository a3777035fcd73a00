"""The README's run command, as a new user runs it: `bash scripts/run.sh`, then a session from a
client (get_cookie, a tool call, release), then Ctrl-C. It runs on ports, a manager_id and a key
prefix of its own (environment overrides run.sh and the config take), with its tokens given in
the environment so that it writes no file, and it leaves nothing running or made behind."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from pathlib import Path

import docker
import httpx
import redis

from testing.harness import free_port
from tests.conftest import ROOT, project_containers, wait_for


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-s", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_the_readmes_run_command_serves_a_session_and_stops_clean(docker_client: docker.DockerClient,
                                                                  redis_client: redis.Redis, prefix: str,
                                                                  manager_id: str, tmp_path: Path) -> None:
    port, console_port = free_port(), free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TSM_")},
           "TSM_PORT": str(port), "TSM_ADMIN__CONSOLE_PORT": str(console_port), "TSM_MANAGER_ID": manager_id,
           "TSM_REDIS__KEY_PREFIX": prefix, "TSM_ADMIN__TOKEN": uuid.uuid4().hex,
           "TSM_CLUSTER__NODE_SECRET_KEY": uuid.uuid4().hex}
    if "TSM_NODE_IMAGE" in os.environ:  # a work tree testing its own node image
        env["TSM_ENGINE__DOCKER__CREATION_KWARGS__IMAGE"] = os.environ["TSM_NODE_IMAGE"]
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", str(ROOT / "scripts/run.sh")], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def alive() -> bool:
            assert proc.poll() is None, log.read_text()[-4000:]
            try:
                return httpx.get(f"http://127.0.0.1:{port}/alive", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(alive, timeout=180, interval=0.2, what="the manager of scripts/run.sh answering")
        assert f"[run] manager on http://127.0.0.1:{port}" in log.read_text()
        # what a client does (XAgent's ToolServerManager calls)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            r = c.post("/get_cookie")
            assert r.status_code == 200 and r.json()["message"] == "add cookie", r.text
            node_id = r.cookies["node_id"]
            assert len(project_containers(docker_client, manager_id)) == 1
            assert docker_client.containers.get(node_id).status == "running"  # named after its session
            r = c.post("/execute_tool", json={"tool_name": "shell_command_executor",
                                              "arguments": {"command": "echo from-run-sh"}})
            assert r.status_code == 200 and "from-run-sh" in r.text, r.text
            assert c.post("/release_session").status_code == 200
        assert not project_containers(docker_client, manager_id)
        assert not redis_client.exists(f"{prefix}:node:{node_id}")
        # Ctrl-C: the whole foreground process group gets SIGINT, as from a terminal
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(30) == 0, log.read_text()[-4000:]
        assert "Traceback" not in log.read_text(), log.read_text()[-4000:]
        assert not _children(proc.pid), "processes of run.sh still running"
        assert not redis_client.exists(f"{prefix}:mgr:{manager_id}:lease")  # the lease handed back
        assert not list(redis_client.scan_iter(f"{prefix}:replica:*"))  # and the replica deregistered
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
