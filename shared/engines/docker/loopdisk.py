"""Fixed-size file systems in sparse image files, attached as loop devices.

Used for node workspaces: overlay2 on ext4 cannot bound a container's writes and this kernel
has no XFS project quota, but an ext4 file system in an image of N bytes holds at most N
bytes, and its sparse file takes on the host only what was written. Blocking calls: run
them in a thread.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from shared.errors import ConfigError, EngineError


class DiskError(EngineError):
    """A workspace image could not be made or attached (the message names the step)."""


def check_tools() -> None:
    """Raise ConfigError naming what is missing for bounded workspaces."""
    missing = [t for t in ("mkfs.ext4", "debugfs", "losetup") if shutil.which(t) is None]
    if missing:
        raise ConfigError(f"node.disk.workspace_bytes needs {', '.join(missing)} (e2fsprogs, mount)")
    if os.geteuid() != 0:
        raise ConfigError("node.disk.workspace_bytes needs root (loop devices); set it to 0 to run "
                          "without a workspace bound")


def _run(*argv: str) -> str:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except OSError as exc:
        raise DiskError(f"{argv[0]}: {exc}") from exc
    if res.returncode != 0:
        raise DiskError(f"{' '.join(argv[:2])} failed: {(res.stderr or res.stdout).strip()[:300]}")
    return res.stdout.strip()


def create(path: str, size: int, uid: int = 1000, gid: int = 1000) -> str:
    """Make an ext4 image of ``size`` bytes owned by uid:gid at its root, attach it; the device."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    try:
        # 0600 from the first byte: the image holds a session's files, no other host user may read them
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.truncate(size)
        _run("mkfs.ext4", "-q", "-F", "-m", "0", "-E",
             f"root_owner={uid}:{gid},lazy_itable_init=1,lazy_journal_init=1", path)
        # an empty workspace, as before: no lost+found in the node's listing
        _run("debugfs", "-w", "-R", "rmdir lost+found", path)
        return _run("losetup", "--find", "--show", path)
    except BaseException:
        with_unlink(path)
        raise


def attach(path: str) -> str:
    """The loop device backing ``path``, attached now if it was not (after a reboot, say)."""
    if not os.path.exists(path):
        raise DiskError(f"the image {path} does not exist")
    os.chmod(path, 0o600)  # images made before they were created 0600
    return device_of(path) or _run("losetup", "--find", "--show", path)


def device_of(path: str) -> str:
    """The loop device backed by ``path`` ("" when none)."""
    out = _run("losetup", "--associated", path) if os.path.exists(path) else ""
    return out.splitlines()[0].split(":", 1)[0].strip() if out else ""  # "/dev/loop3: [64769]:12 (path)"


def destroy(path: str) -> None:
    """Detach every loop device of ``path`` and delete it; nothing left is fine."""
    for _ in range(8):  # one image is attached once, but be sure
        dev = device_of(path)
        if not dev:
            break
        try:
            _run("losetup", "--detach", dev)
        except DiskError:
            if device_of(path) == dev:  # not detached by someone else meanwhile: a real failure
                raise
    with_unlink(path)


def with_unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def mount_point(device: str) -> str:
    """Where ``device`` is mounted in this mount namespace ("" when nowhere)."""
    if not device:
        return ""
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            head, _, tail = line.partition(" - ")
            rest = tail.split()
            if len(rest) >= 2 and rest[1] == device:
                # octal escapes (\040 for a space) as the kernel writes them
                return head.split()[4].encode().decode("unicode_escape")
    return ""


# The file system is frozen (fsfreeze: flushed, writes held, reads served) only while its image is
# copied; the trap thaws it on every exit. Run in a session of its own, so a manager killed
# mid-copy cannot leave a session's workspace frozen: the script finishes and thaws by itself.
# Prints the nanoseconds the file system was held.
_CAPTURE = r"""
set -eu
mnt="$1" src="$2" dst="$3" pid="$4"
# the mount is seen in the mount namespace of pid when given (a node's: where the engine mounted it)
in_ns() { if [ -n "$pid" ]; then nsenter -t "$pid" -m -- "$@"; else "$@"; fi; }
# written back before the freeze, so the freeze itself flushes only what came since
if [ -n "$mnt" ]; then in_ns sync -f "$mnt"; fi
t0=$(date +%s%N)
if [ -n "$mnt" ]; then
  in_ns fsfreeze -f "$mnt"
  trap 'in_ns fsfreeze -u "$mnt"' EXIT
fi
cp --reflink=auto --sparse=always "$src" "$dst"
if [ -n "$mnt" ]; then in_ns fsfreeze -u "$mnt"; trap - EXIT; fi
t1=$(date +%s%N)
echo $((t1 - t0))
"""


def capture(path: str, dest: str, mount: str = "", timeout: float = 600.0, pid: int = 0) -> float:
    """Copy the image ``path`` to ``dest`` as it is at one instant, sparse as it is: its file
    system (mounted at ``mount``, "" when not mounted; in the mount namespace of ``pid`` when
    given) frozen only while the bytes are copied; the seconds writes were held. ``dest``
    appears whole or not at all."""
    os.makedirs(os.path.dirname(dest), mode=0o700, exist_ok=True)
    part = dest + ".part"
    try:
        res = subprocess.run(["sh", "-c", _CAPTURE, "capture", mount, path, part, str(pid or "")],
                             capture_output=True, text=True, timeout=timeout, start_new_session=True)
        if res.returncode != 0:
            raise DiskError(f"copying {os.path.basename(path)} failed: {(res.stderr or res.stdout).strip()[:300]}")
        os.chmod(part, 0o600)
        os.rename(part, dest)
    except BaseException:
        with_unlink(part)
        raise
    return int(res.stdout.strip().splitlines()[-1]) / 1e9


def create_from(path: str, seed: str) -> str:
    """A new image at ``path``, a sparse copy of the image ``seed``, attached; the device."""
    if not os.path.exists(seed):
        raise DiskError(f"the image {seed} does not exist")
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    try:
        # O_EXCL first: never write over another session's image
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        # a reflink where the file system has them (XFS, btrfs): no bytes copied at all
        _run("cp", "--reflink=auto", "--sparse=always", seed, path)
        return _run("losetup", "--find", "--show", path)
    except BaseException:
        with_unlink(path)
        raise


def disk_bytes(path: str) -> int:
    """Bytes a (sparse) file takes on the host's disk (0 when it does not exist)."""
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0
