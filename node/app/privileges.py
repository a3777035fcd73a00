"""The server's own switch from root to its uid, for runtimes without ambient capabilities (gVisor):
there entrypoint.sh cannot hand capabilities across exec, so the server starts as root and drops
here, first thing, keeping only the capabilities it needs (PR_SET_KEEPCAPS, then capset)."""

import ctypes
import os

_PR_SET_KEEPCAPS = 8
_PR_SET_DUMPABLE = 4
_CAP_VERSION_3 = 0x20080522
# kill, setgid, setuid: start and end tools as their uid; dac_override, fowner: workspace files
_KEEP = (1 << 5) | (1 << 6) | (1 << 7) | (1 << 1) | (1 << 3)


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _scrub_environ(libc) -> None:
    """Blank the values of NODE_* in the process's own environment block: /proc/<pid>/environ
    shows that block, and gVisor lets a process of another uid read it (os.environ is a copy)."""
    environ = ctypes.POINTER(ctypes.c_void_p).in_dll(libc, "environ")
    i = 0
    while environ[i]:
        entry = ctypes.string_at(environ[i])
        name, _, value = entry.partition(b"=")
        if name.startswith(b"NODE_") and value:
            ctypes.memset(environ[i] + len(name) + 1, 0, len(value))
        i += 1


def drop_to_server() -> None:
    """As root with NODE_SERVER_UID set: become that uid holding only _KEEP, none inheritable."""
    uid = os.environ.pop("NODE_SERVER_UID", "")
    gid = os.environ.pop("NODE_SERVER_GID", "")
    if not uid:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    _scrub_environ(libc)
    if libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_KEEPCAPS)")
    os.setgroups([])
    os.setresgid(int(gid), int(gid), int(gid))
    os.setresuid(int(uid), int(uid), int(uid))
    data = (_Data * 2)()
    data[0].effective = data[0].permitted = _KEEP
    if libc.capset(ctypes.byref(_Header(_CAP_VERSION_3, 0)), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")
    libc.prctl(_PR_SET_KEEPCAPS, 0, 0, 0, 0)
    # not dumpable, as Linux makes a process that changed uid: its /proc files belong to root
    if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE)")
    if os.getuid() == 0 or os.geteuid() == 0:  # never the server as root
        raise OSError("the node server is still root")
