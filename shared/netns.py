"""Sockets made in another process's network namespace (node.network.firewall_host_namespace).

The chart's pods share the host's PID namespace but not its network: the node bridges, their
addresses and the nft tables are in the engine's (dockerd's) network namespace. A socket belongs
to the namespace it was made in for its whole life, so the egress resolver and proxy make their
listening sockets there (in a short-lived thread that enters it with setns(2): only that thread
moves) and serve them from the manager's event loop like any other; the connections they open
upstream come from the manager's own namespace. Commands (nft, ip) run there with nsenter.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000  # linux/sched.h
_libc = ctypes.CDLL(None, use_errno=True)  # os.setns is Python 3.12+


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def made_in(pid: int | None, make: Callable[[], T]) -> T:
    """``make()`` run with the network namespace of ``pid`` (None: here), e.g. to bind sockets there."""
    if pid is None:
        return make()
    box: dict[str, Any] = {}

    def work() -> None:
        # a thread of its own: if the way back failed, the thread ends and nothing else runs there
        try:
            own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
            try:
                target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
                try:
                    _setns(target)
                    try:
                        box["value"] = make()
                    finally:
                        _setns(own)
                finally:
                    os.close(target)
            finally:
                os.close(own)
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    t = threading.Thread(target=work, name="netns", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


def nsenter(pid: int | None) -> list[str]:
    """The argv prefix that runs a command in ``pid``'s network namespace (empty: here), and in its
    mount namespace: the command is then the engine host's own (nft, ip), which the manager's image
    need not carry, as shared/firewall.py runs the host's iptables."""
    return [] if pid is None else ["nsenter", "--target", str(pid), "--mount", "--net", "--"]
