"""Workspace images on the real loop devices and e2fsprogs: readable by root only."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from shared.engines.docker import loopdisk


def test_workspace_images_are_root_only(tmp_path: Path) -> None:
    image = str(tmp_path / "img" / "ws.img")
    os.umask(0o022)  # the usual umask: what made images 0644 before
    try:
        dev = loopdisk.create(image, 16 << 20)
        assert dev.startswith("/dev/loop")
        assert stat.S_IMODE(os.stat(image).st_mode) == 0o600
        loopdisk.destroy(image)
        # one made before images were 0600 is narrowed when it is attached again
        Path(image).write_bytes(b"")
        os.chmod(image, 0o644)
        os.truncate(image, 16 << 20)
        loopdisk.attach(image)
        assert stat.S_IMODE(os.stat(image).st_mode) == 0o600
    finally:
        loopdisk.destroy(image)
