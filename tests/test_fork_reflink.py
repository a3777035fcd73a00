"""Forks and snapshots on the two kinds of images directory: XFS with reflinks (made by
scripts/images-fs.sh, as the set-up makes node.disk.image_dir), where a copy is a clone sharing
the source's extents, and ext4, where a copy is a sparse copy of the bytes. Both on the real
engine: each copy holds the source's files, and a write in one copy changes no other image."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import docker
import httpx
import pytest
import redis

from tests.conftest import wait_for
from tests.test_fork import shell

ROOT = Path(__file__).resolve().parent.parent
WS = "/app/workspace"
SUMS = f"cd {WS} && find . -type f -print0 | sort -z | xargs -0 sha256sum"
SETUP = (f"cd {WS} && head -c 32M /dev/urandom > data.bin && printf 'hello\\n' > text.txt && "
         "mkdir -p a/b && echo leaf > a/b/leaf.txt && sync && echo ok")


def run(*argv: str) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"{argv}: {res.stderr or res.stdout}"
    return res.stdout


def shared_extents(path: str) -> int:
    """Extents of path that the file system marks as shared with another file (a reflink)."""
    return sum(1 for line in run("filefrag", "-v", path).splitlines() if "shared" in line.split(":")[-1])


def used_bytes(path: str) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def unmount(mnt: Path) -> None:
    # a loop mount made with -o loop detaches its device on umount. The directory is set up before
    # the manager's fixtures and so torn down after them: its sessions' images are gone by now;
    # lazily all the same, never left mounted
    if subprocess.run(["mountpoint", "-q", str(mnt)]).returncode == 0 and \
            subprocess.run(["umount", str(mnt)]).returncode != 0:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def xfs_dir(tmp_path: Path) -> Iterator[Path]:
    """An images directory made by scripts/images-fs.sh: XFS with reflinks, loop-mounted."""
    mnt, image = tmp_path / "images", tmp_path / "images.xfs"
    env = {**os.environ, "TSM_IMAGES_FS_FILE": str(image), "TSM_IMAGES_FS_BYTES": str(4 << 30)}
    try:
        subprocess.run(["bash", str(ROOT / "scripts/images-fs.sh"), str(mnt)], env=env, check=True, timeout=120)
        assert run("findmnt", "-n", "-o", "FSTYPE", str(mnt)).strip() == "xfs"
        # a second run finds it done: same mount, nothing made again
        subprocess.run(["bash", str(ROOT / "scripts/images-fs.sh"), str(mnt)], env=env, check=True, timeout=120)
        assert len(run("findmnt", "-n", "-o", "TARGET", str(mnt)).split()) == 1
        yield mnt
    finally:
        unmount(mnt)
        image.unlink(missing_ok=True)


@pytest.fixture
def ext4_dir(tmp_path: Path) -> Iterator[Path]:
    """An images directory on ext4 of its own (no reflinks), loop-mounted."""
    mnt, image = tmp_path / "images", tmp_path / "images.ext4"
    mnt.mkdir()
    try:
        with open(image, "wb") as f:
            f.truncate(3 << 30)
        run("mkfs.ext4", "-q", "-F", str(image))
        run("mount", "-o", "loop", str(image), str(mnt))
        yield mnt
    finally:
        unmount(mnt)
        image.unlink(missing_ok=True)


def fork_and_check(m_url: str, images: Path, count: int) -> tuple[str, list[str], str]:
    """A source with files forked into count: every copy holds the source's files; the ids and sums."""
    src = httpx.Client(base_url=m_url, timeout=120)
    assert src.post("/get_cookie").status_code == 200
    src_id = src.cookies["node_id"]
    assert shell(src, SETUP).endswith("ok")
    sums = shell(src, SUMS)
    assert "data.bin" in sums and "leaf.txt" in sums
    r = src.post("/fork_session", json={"count": count})
    assert r.status_code == 200, r.text
    copies = r.json()["sessions"]
    assert len(set(copies)) == count, r.text
    for cid in copies:
        assert (images / f"tsm-session-{cid}.img").exists()  # the copies' images are in this directory
        got = shell(httpx.Client(base_url=m_url, cookies={"node_id": cid}, timeout=120), SUMS)
        assert got == sums, (cid, got, sums)
    return src_id, copies, sums


def write_in_first(m_url: str, ids: list[str], sums: str) -> None:
    """An overwrite in the middle of a file in the first session changes it there and nowhere else."""
    first = httpx.Client(base_url=m_url, cookies={"node_id": ids[0]}, timeout=120)
    shell(first, f"cd {WS} && head -c 1M /dev/urandom | dd of=data.bin bs=1M seek=7 conv=notrunc,fsync status=none "
                 "&& echo changed >> text.txt && sync")
    assert shell(first, SUMS) != sums
    for i in ids[1:]:
        assert shell(httpx.Client(base_url=m_url, cookies={"node_id": i}, timeout=120), SUMS) == sums


def test_fork_on_xfs_clones_the_image(xfs_dir: Path, start_manager) -> None:
    before = used_bytes(str(xfs_dir))
    m = start_manager(node={"disk": {"image_dir": str(xfs_dir)}})
    src_id, copies, sums = fork_and_check(m.url, xfs_dir, 3)
    images = [str(xfs_dir / f"tsm-session-{i}.img") for i in [src_id, *copies]]
    # every copy shares extents with the source (a clone: the 32 MiB of data were not written again)
    for path in images:
        assert shared_extents(path) > 0, run("filefrag", "-v", path)
    # four images holding 32 MiB each take the disk of about one: less than two copies' worth
    assert used_bytes(str(xfs_dir)) - before < 2 * (32 << 20), (before, used_bytes(str(xfs_dir)))
    # a write in a copy goes to blocks of its own: the source and the other copies keep theirs
    write_in_first(m.url, [copies[0], src_id, *copies[1:]], sums)

    # a snapshot is a clone too, and still counts the workspace's written bytes against
    # fork.snapshot_bytes (st_blocks counts shared blocks in full): a clone is not free in quota
    src = httpx.Client(base_url=m.url, cookies={"node_id": src_id}, timeout=120)
    r = src.post("/snapshot_session", json={"name": "on-xfs"})
    assert r.status_code == 200, r.text
    snap = next(s for s in src.get("/snapshots").json()["snapshots"] if s["name"] == "on-xfs")
    assert snap["bytes"] >= 32 << 20, snap
    seeds = list((xfs_dir / "seeds").glob("snap-*.img"))
    assert len(seeds) == 1 and shared_extents(str(seeds[0])) > 0
    # a session from it holds the snapshot's files
    c = httpx.Client(base_url=m.url, timeout=120)
    assert c.post("/get_cookie", json={"snapshot": "on-xfs"}).status_code == 200
    assert shell(c, SUMS) == sums
    assert src.delete("/snapshots/on-xfs").status_code == 200
    for i in [src_id, *copies, c.cookies["node_id"]]:
        httpx.post(m.url + "/release_session", cookies={"node_id": i}, timeout=120)


def test_fork_on_ext4_copies_the_bytes(ext4_dir: Path, start_manager) -> None:
    probe = ext4_dir / "probe"
    probe.write_bytes(b"x" * 4096)
    # this directory has no reflinks: the copies below went the other way
    assert subprocess.run(["cp", "--reflink=always", str(probe), str(probe) + ".2"], capture_output=True).returncode != 0
    probe.unlink()
    before = used_bytes(str(ext4_dir))
    m = start_manager(node={"disk": {"image_dir": str(ext4_dir)}})
    src_id, copies, sums = fork_and_check(m.url, ext4_dir, 2)
    for i in [src_id, *copies]:
        path = str(ext4_dir / f"tsm-session-{i}.img")
        assert shared_extents(path) == 0, run("filefrag", "-v", path)
        # still sparse: 1 GiB images holding 32 MiB
        assert os.stat(path).st_blocks * 512 < 512 << 20, (path, os.stat(path).st_blocks)
    # each of the three images holds its own 32 MiB
    assert used_bytes(str(ext4_dir)) - before >= 3 * (32 << 20), (before, used_bytes(str(ext4_dir)),
                                                                  run("du", "-a", str(ext4_dir)))
    write_in_first(m.url, [copies[0], src_id, *copies[1:]], sums)
    for i in [src_id, *copies]:
        httpx.post(m.url + "/release_session", cookies={"node_id": i}, timeout=120)


def test_fork_hands_copies_to_running_pool_nodes(xfs_dir: Path, start_manager, manager_id: str, prefix: str,
                                                  redis_client: redis.Redis,
                                                  docker_client: docker.DockerClient) -> None:
    """With a warm pool, a fork's copies are pooled nodes already running, given a clone of the
    source's image in place (no container started for them); each is still a session of its own,
    keeps the copy across a stop and start of its container, and forks in turn. A session from a
    snapshot is a pooled node given the snapshot's copy too."""
    m = start_manager(node={"disk": {"image_dir": str(xfs_dir)}},
                      pool={"size": 3, "max_size": 3, "max_age_seconds": 3600}, checker={"interval_seconds": 0.3})
    pool_key = f"{prefix}:mgr:{manager_id}:pool"
    src = httpx.Client(base_url=m.url, timeout=120)
    assert src.post("/get_cookie").status_code == 200
    src_id = src.cookies["node_id"]
    assert shell(src, SETUP).endswith("ok")
    sums = shell(src, SUMS)
    wait_for(lambda: redis_client.llen(pool_key) == 3, timeout=120, what="pool filled")
    pooled = {x.decode() for x in redis_client.lrange(pool_key, 0, -1)}
    containers = {i: redis_client.hget(f"{prefix}:node:{i}", "container_id") for i in pooled}

    r = src.post("/fork_session", json={"count": 2})
    assert r.status_code == 200, r.text
    copies = r.json()["sessions"]
    assert r.json()["from_pool"] == 2 and set(copies) <= pooled and len(set(copies)) == 2
    for cid in copies:
        rec = redis_client.hgetall(f"{prefix}:node:{cid}")
        # the same running container as when it was pooled, now a session of the source's client
        assert rec[b"role"] == b"node" and rec[b"container_id"] == containers[cid]
        assert rec[b"client"] == redis_client.hget(f"{prefix}:node:{src_id}", "client")
        c = httpx.Client(base_url=m.url, cookies={"node_id": cid}, timeout=120)
        assert shell(c, SUMS) == sums
        # its image is a clone of the source's
        assert shared_extents(str(xfs_dir / f"tsm-session-{cid}.img")) > 0
    # each keeps a secret of its own (the node's, given when it was made for the pool)
    envs = [docker_client.api.inspect_container(redis_client.hget(f"{prefix}:node:{i}", "container_id").decode())
            ["Config"]["Env"] for i in [src_id, *copies]]
    assert len({next(e for e in env if e.startswith("NODE_SECRET=")) for env in envs}) == 3
    write_in_first(m.url, [copies[0], src_id, copies[1]], sums)
    changed = shell(httpx.Client(base_url=m.url, cookies={"node_id": copies[0]}, timeout=120), SUMS)

    # a session from a snapshot is a pooled node given the snapshot's copy the same way
    assert src.post("/snapshot_session", json={"name": "pooled"}).status_code == 200
    wait_for(lambda: redis_client.llen(pool_key) == 3, timeout=120, what="pool refilled")
    pooled = {x.decode() for x in redis_client.lrange(pool_key, 0, -1)}
    from_snap = httpx.Client(base_url=m.url, timeout=120)
    assert from_snap.post("/get_cookie", json={"snapshot": "pooled"}).status_code == 200
    assert from_snap.cookies["node_id"] in pooled
    assert shell(from_snap, SUMS) == sums
    assert src.delete("/snapshots/pooled").status_code == 200

    # a stop and a start of the copy's container (XAgent's close, then a call) mount its volume
    # again: it must be the copy's image, not the empty one the pooled node was made with
    first = httpx.Client(base_url=m.url, cookies={"node_id": copies[0]}, timeout=120)
    assert first.post("/close_session").status_code == 200
    wait_for(lambda: not docker_client.api.inspect_container(containers[copies[0]].decode())["State"]["Running"],
             timeout=120, what="the copy's container stopped")
    assert shell(first, SUMS) == changed
    # a fork of a copy: its workspace is frozen and copied where its node mounts it
    r = first.post("/fork_session", json={"count": 1})
    assert r.status_code == 200, r.text
    grand = r.json()["sessions"][0]
    assert shell(httpx.Client(base_url=m.url, cookies={"node_id": grand}, timeout=120), SUMS) == changed

    for i in [src_id, *copies, grand, from_snap.cookies["node_id"]]:
        httpx.post(m.url + "/release_session", cookies={"node_id": i}, timeout=120)
    # nothing of the pooled nodes' first images is left attached once their sessions are gone
    wait_for(lambda: not [line for line in run("losetup", "-l").splitlines()
                          if any(f"tsm-session-{i}" in line for i in copies)],
             timeout=120, what="the copies' loop devices detached")
