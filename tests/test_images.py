"""The node image on the real engine: a manager whose image is missing says so in /ready and
answers get_cookie 503 naming it, leaving nothing behind; once the image is there (docker tag),
it works without a restart; where its registry is reachable (one on 127.0.0.1 here), it is pulled
at start."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import httpx
import pytest
import redis

from testing.harness import free_port, stop_process
from tests.conftest import LABEL, NODE_IMAGE, wait_for


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[str]:
    """Debian's docker-registry on 127.0.0.1 (an insecure registry the engine accepts there); its address."""
    port = free_port()
    cfg = tmp_path / "registry.yml"
    cfg.write_text(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {tmp_path / 'registry'}\n"
                   f"http:\n  addr: 127.0.0.1:{port}\n")
    proc = subprocess.Popen(["docker-registry", "serve", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "registry.log", "ab"))  # noqa: SIM115  (the registry owns it)
    def up() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"docker-registry exited: {(tmp_path / 'registry.log').read_text()[-2000:]}")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/v2/", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, what="the registry")
        yield f"127.0.0.1:{port}"
    finally:
        stop_process(proc, 5)
        # its storage holds a node image's layers (~200 MB): pytest keeps temp dirs of past runs
        shutil.rmtree(tmp_path / "registry", ignore_errors=True)


def test_missing_image_is_a_503_naming_it_until_it_is_tagged(start_manager, docker_client: docker.DockerClient,
                                                             redis_client: redis.Redis, prefix: str,
                                                             manager_id: str) -> None:
    image = f"toolserver-node:absent-{uuid.uuid4().hex[:8]}"
    m = start_manager(node={"creation_kwargs": {"image": image}})
    try:
        # no registry is reachable here: the pull at start fails, and /ready says so
        wait_for(lambda: "image_pull_failed" in m.logs(), what="the pull at start to fail")
        assert f"image_pull_started image={image}" in m.logs()
        r = httpx.get(m.url + "/ready", timeout=10)
        assert r.status_code == 503, r.text
        assert r.json()["image"].startswith(f"node image {image} is not on the engine (pull failed: ")
        assert image in r.json()["detail"] and r.json()["engine"] == "ok" and r.json()["redis"] == "ok"

        r = httpx.post(m.url + "/get_cookie", timeout=60)
        assert r.status_code == 503, r.text
        assert r.json() == {"detail": f"node image {image} is not on the engine"}
        assert "node_id" not in r.cookies
        # nothing left behind: no container, volume or record, no creation slot held
        label = f"{LABEL}={manager_id}"
        assert not docker_client.containers.list(all=True, sparse=True, filters={"label": label})
        assert not docker_client.volumes.list(filters={"label": label})
        assert not redis_client.keys(f"{prefix}:node:*")
        assert not redis_client.smembers(f"{prefix}:mgr:{manager_id}:nodes")

        docker_client.images.get(NODE_IMAGE).tag(image)  # the operator loads it: no restart needed
        r = httpx.get(m.url + "/ready", timeout=10)
        assert r.status_code == 200 and r.json()["image"] == "ok", r.text
        c = httpx.Client(base_url=m.url, timeout=60)
        assert c.post("/get_cookie").status_code == 200
        assert docker_client.containers.get(c.cookies["node_id"]).image.id == docker_client.images.get(NODE_IMAGE).id
        assert c.post("/").json() == {"message": "Hello World"}
        assert c.post("/release_session").status_code == 200
    finally:
        m.stop()
        try:
            docker_client.images.remove(image, noprune=True)
        except docker.errors.ImageNotFound:
            pass


def test_never_pull_waits_for_the_image_to_be_loaded(start_manager) -> None:
    image = f"toolserver-node:absent-{uuid.uuid4().hex[:8]}"
    m = start_manager(node={"image_pull": "never", "creation_kwargs": {"image": image}})
    r = httpx.get(m.url + "/ready", timeout=10)
    assert r.status_code == 503
    assert r.json()["image"] == (f"node image {image} is not on the engine (node.image_pull is never: "
                                 "load it onto the engine (docker load, docker pull, docker tag))")
    wait_for(lambda: f"image_missing image={image}" in m.logs(), what="the check at start")
    assert "image_pull_started" not in m.logs()


def test_missing_image_is_pulled_at_start_from_its_registry(registry: str, start_manager,
                                                           docker_client: docker.DockerClient) -> None:
    image = f"{registry}/toolserver-node:{uuid.uuid4().hex[:8]}"
    docker_client.images.get(NODE_IMAGE).tag(image)
    try:
        for line in docker_client.api.push(image, stream=True, decode=True):
            assert "error" not in line, line
        docker_client.images.remove(image, noprune=True)  # only in the registry now
        m = start_manager(node={"creation_kwargs": {"image": image}})
        wait_for(lambda: f"image_pulled image={image}" in m.logs(), what="the pull at start")
        assert f"image_pull_started image={image}" in m.logs()
        assert f"image_pull_progress image={image} layers_done=" in m.logs()
        r = httpx.get(m.url + "/ready", timeout=10)
        assert r.status_code == 200 and r.json()["image"] == "ok", r.text
        c = httpx.Client(base_url=m.url, timeout=60)
        assert c.post("/get_cookie").status_code == 200
        assert c.post("/").json() == {"message": "Hello World"}
        assert c.post("/release_session").status_code == 200
    finally:
        try:
            docker_client.images.remove(image, noprune=True)
        except docker.errors.ImageNotFound:
            pass
