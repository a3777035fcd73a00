"""The manager image for the tests that run it as a container (the chart's pod, the live cluster).

scripts/build-manager-image.sh caches the image under a tag of its content hash (``ctx-...``), so
a run whose sources did not change builds nothing; the test's own tag and the version tag the
script moves are gone after it (the version tag given back to the image it named before), and the
image stays under its ctx tag only: no untagged image is left behind.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from testing import machine

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def manager_image(client: Any, tag: str) -> Iterator[str]:
    """The manager image of this tree under ``tag`` while the block runs. ``client``: a DockerClient."""
    import docker

    repo = tag.rsplit(":", 1)[0]
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    version_tag = f"{repo}:{version}"
    try:
        had = client.images.get(version_tag).id
    except docker.errors.ImageNotFound:
        had = None
    machine.RUN.images.update({tag, version_tag})
    try:
        build = subprocess.run(["bash", str(ROOT / "scripts/build-manager-image.sh")], capture_output=True, text=True,
                               env={**os.environ, "TSM_MANAGER_IMAGE": tag})
        if build.returncode != 0:
            raise RuntimeError(f"scripts/build-manager-image.sh failed:\n{build.stderr[-3000:]}")
        yield tag
    finally:
        for t in (tag, version_tag):
            with contextlib.suppress(docker.errors.ImageNotFound, docker.errors.APIError):
                client.images.remove(t)
        if had is not None:
            with contextlib.suppress(docker.errors.ImageNotFound):
                client.images.get(had).tag(version_tag)
