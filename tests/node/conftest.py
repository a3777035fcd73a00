"""Fixtures for the node image tests: real containers of toolserver-node:latest on the local engine.

Every container is labelled ``toolserver-manager.manager_id=test-node-image`` and
``toolserver-manager.role=test``, publishes 31942 on 127.0.0.1 only (random host port), runs with a
read-only root filesystem (tmpfs /tmp and workspace, as a locked-down node would), and is removed in
teardown; leftovers of an interrupted run are removed by label first.
"""

import os
import time
import uuid

import pytest

IMAGE = os.environ.get("TSM_NODE_IMAGE", "toolserver-node:latest")
NODE_PORT = 31942
LABELS = {"toolserver-manager.manager_id": "test-node-image", "toolserver-manager.role": "test"}
LABEL_FILTER = {"label": [f"{k}={v}" for k, v in LABELS.items()]}
SECRET = "node-image-test-secret"  # what the manager hands a node as NODE_SECRET


class Node:
    """A running node container and an HTTP client pointed at its published port."""

    def __init__(self, container, port: int, secret: str = SECRET):
        import httpx

        self.container = container
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.ws_base = f"ws://127.0.0.1:{port}"
        self.auth = {"X-Node-Secret": secret}
        self.http = httpx.Client(base_url=self.base, timeout=30, headers=self.auth)

    def ws(self, path: str, **kw):
        """A WebSocket to the node, with its secret."""
        from websockets.sync.client import connect

        return connect(self.ws_base + path, additional_headers=self.auth, **kw)

    def post(self, path, **kw):
        return self.http.post(path, **kw)

    def tool(self, tool_name, env_name=None, **arguments):
        body = {"tool_name": tool_name, "arguments": arguments}
        if env_name is not None:
            body["env_name"] = env_name
        return self.http.post("/execute_tool", json=body)

    def sh(self, cmd: str) -> tuple:
        """Run ``cmd`` in the container through docker exec (for checks behind the node's back)."""
        res = self.container.exec_run(["sh", "-c", cmd], user="0")
        return res.exit_code, res.output.decode(errors="replace")

    def close(self):
        self.http.close()


def _remove_leftovers(client):
    for c in client.containers.list(all=True, sparse=True, filters=LABEL_FILTER):
        try:
            c.remove(force=True)
        except Exception:
            pass


@pytest.fixture(scope="session")
def docker_client():
    import docker

    try:
        client = docker.from_env(timeout=60)
        client.ping()
    except Exception as exc:  # the suite needs the real engine: say so plainly
        pytest.fail(f"Docker engine not reachable ({exc}); run `bash scripts/setup.sh` first")
    try:
        client.images.get(IMAGE)
    except Exception:
        pytest.fail(f"image {IMAGE} not found; build it with `bash node/build.sh`")
    _remove_leftovers(client)
    yield client
    _remove_leftovers(client)
    client.close()


def wait_ready(base: str, timeout: float = 15.0, secret: str = SECRET) -> float:
    import httpx

    t0 = time.monotonic()
    while True:
        try:
            if httpx.get(base + "/", timeout=1, headers={"X-Node-Secret": secret}).status_code in (200, 401):
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"node at {base} not ready after {timeout} s")
        time.sleep(0.02)


@pytest.fixture(scope="session")
def start_node(docker_client):
    """Factory: start a node container (removed at the end of the session at the latest)."""
    started = []

    def start(environment=None, init=False, read_only=True, **extra):
        container = docker_client.containers.run(
            IMAGE,
            detach=True,
            name=f"test-node-image-{uuid.uuid4().hex[:10]}",
            labels=LABELS,
            ports={f"{NODE_PORT}/tcp": ("127.0.0.1", None)},
            read_only=read_only,
            tmpfs={"/tmp": "rw,exec,nosuid,size=512m",
                   "/app/workspace": "rw,exec,nosuid,uid=1000,gid=1000,mode=0755,size=512m"},
            environment={"NODE_SECRET": SECRET, **(environment or {})},
            init=init,
            mem_limit="1g",
            pids_limit=512,
            **extra,
        )
        started.append(container)
        container.reload()
        port = int(container.ports[f"{NODE_PORT}/tcp"][0]["HostPort"])
        node = Node(container, port)
        try:
            wait_ready(node.base)
        except TimeoutError:
            logs = container.logs().decode(errors="replace")
            raise AssertionError(f"node did not become ready; logs:\n{logs}") from None
        return node

    yield start
    for c in started:
        try:
            c.remove(force=True)
        except Exception:
            pass


@pytest.fixture(scope="module")
def node(start_node):
    """One node shared by a module's tests; short tool timeouts so the timeout paths run quickly."""
    n = start_node(environment={"NODE_SHELL_TIMEOUT": "3", "NODE_NOTEBOOK_TIMEOUT": "3",
                                "NODE_SHELL_ASYNC_WAIT": "2"})
    yield n
    n.close()
    try:
        n.container.remove(force=True)
    except Exception:
        pass
