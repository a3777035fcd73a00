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
import sys

from shared.errors import ConfigError, EngineError


class DiskError(EngineError):
    """A workspace image could not be made or attached (the message names the step)."""


BACKGROUND_NICE = 10  # a pool refill's mkfs yields to the replica's own work


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


def create(path: str, size: int, uid: int = 1000, gid: int = 1000, background: bool = False) -> str:
    """Make an ext4 image of ``size`` bytes owned by uid:gid at its root, attach it; the device.
    In the background (a pool refill) mkfs runs niced, so it yields the CPU to clients' work."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    try:
        # 0600 from the first byte: the image holds a session's files, no other host user may read them
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.truncate(size)
        _run(*(("nice", "-n", str(BACKGROUND_NICE)) if background else ()), "mkfs.ext4", "-q", "-F", "-m", "0", "-E",
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
    # an image a fork's copy replaced (adopt) may still back a device until its node's mount goes
    for dev in devices_of_deleted(path):
        subprocess.run(["losetup", "--detach", dev], capture_output=True, timeout=60)
    # and a copy being handed to it (adopt's clone, not yet in the image's place) whose replica died
    # mid-way: nobody else would ever remove it
    part = path + ".part"
    for dev in ([device_of(part)] if os.path.exists(part) else []) + devices_of_deleted(part):
        if dev:
            subprocess.run(["losetup", "--detach", dev], capture_output=True, timeout=60)
    with_unlink(part)
    with_unlink(path)
    with_unlink(link_path(path))


def devices_of_deleted(path: str) -> list[str]:
    """Loop devices still backed by a deleted file that was named ``path``."""
    out = subprocess.run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
                         capture_output=True, text=True, timeout=60).stdout
    gone = f"{path} (deleted)"
    return [line.split(None, 1)[0] for line in out.splitlines()
            if len(line.split(None, 1)) == 2 and line.split(None, 1)[1].strip() == gone]


# --- a workspace's device by a name of its own -------------------------------------------
# A volume's options (its device) are fixed when it is made, and the engine mounts that device
# again at each start of its container. A pooled node's volume names a symlink beside its image
# instead of the loop device itself, so that a fork can hand the node another image (adopt): the
# link then leads to the new image's device, and a later start mounts that one, never a device
# number that was given up (and may back another session's image by then).

def link_path(path: str) -> str:
    """Where the device link of the image ``path`` is."""
    return path + ".dev"


def point_link(path: str, device: str) -> str:
    """Point the device link of ``path`` at ``device`` (atomically); the link's path."""
    link = link_path(path)
    tmp = f"{link}.{os.getpid()}.tmp"
    with_unlink(tmp)
    os.symlink(device, tmp)
    os.rename(tmp, link)
    return link


# Mounts a file system in another process's mount namespace (a running node's): made with the new
# mount API in this namespace, where the device is (a container has no loop devices in its /dev),
# then moved into the node's. A process of its own: setns needs a single thread.
_INJECT = r"""
import ctypes, os, sys
pid, dev, target = sys.argv[1], sys.argv[2], sys.argv[3]
libc = ctypes.CDLL(None, use_errno=True)
def ok(r, what):
    if r < 0:
        raise SystemExit(f"{what}: {os.strerror(ctypes.get_errno())}")
    return r
fs = ok(libc.syscall(430, b"ext4", 0), "fsopen")
ok(libc.syscall(431, fs, 1, b"source", dev.encode(), 0), "fsconfig source")
ok(libc.syscall(431, fs, 6, None, None, 0), "fsconfig create")
mnt = ok(libc.syscall(432, fs, 0, 0), "fsmount")
ok(libc.setns(os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY), 0x00020000), "setns")
ok(libc.syscall(429, mnt, b"", -100, target.encode(), 4), "move_mount")
"""


def adopt(path: str, seed: str, pid: int, target: str) -> None:
    """Make the running node ``pid``, whose workspace (at ``target`` in its mount namespace) is the
    image ``path`` reached through its device link, hold a copy of ``seed`` instead: the copy takes
    the image's name, is attached and mounted over ``target`` in the node's namespace (its next
    calls see it), the link is pointed at it (its container's next start mounts it), and the old
    image's device is detached (freed once the node's mount of it goes). DiskError, with the node
    left on its old image when the mount failed."""
    if not os.path.islink(link_path(path)):
        raise DiskError(f"{os.path.basename(path)} has no device link: its volume names a device")
    old = device_of(path)
    part = path + ".part"
    try:
        os.close(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        _run("cp", "--reflink=auto", "--sparse=always", seed, part)
        dev = _run("losetup", "--find", "--show", part)
    except BaseException:
        with_unlink(part)
        raise
    try:
        res = subprocess.run([sys.executable, "-c", _INJECT, str(pid), dev, target], capture_output=True,
                             text=True, timeout=60)
        if res.returncode != 0:
            raise DiskError(f"mounting the copy in the node failed: {(res.stderr or res.stdout).strip()[-300:]}")
    except BaseException:
        subprocess.run(["losetup", "--detach", dev], capture_output=True, timeout=60)
        with_unlink(part)
        raise
    # the copy is the node's workspace from here on: its image takes the name, its device the link
    os.rename(part, path)
    point_link(path, dev)
    if old:
        subprocess.run(["losetup", "--detach", old], capture_output=True, timeout=60)


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
