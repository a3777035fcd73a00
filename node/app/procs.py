"""Child processes of the node: each one leads its own process group, so a timeout or the node's
shutdown can kill it together with everything it started."""

import asyncio
import os
import signal

from . import config

_LIVE: set = set()


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NODE_")}
    env.setdefault("HOME", "/tmp")
    env["PWD"] = config.WORKSPACE
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


# the uid and gid tools run as when the server runs as another (entrypoint.sh sets them): a tool
# can then neither ptrace, signal nor read the environment of the server
TOOL_UID = os.environ.get("NODE_TOOL_UID", "")
TOOL_GID = os.environ.get("NODE_TOOL_GID", TOOL_UID)
# "setpriv" (the server's capabilities are ambient: setpriv clears them) or "fork" (gVisor, no ambient
# capabilities: the server dropped itself, privileges.py, so the forked child switches uid before exec
# and exec leaves it no capability)
TOOL_SWITCH = os.environ.get("NODE_TOOL_SWITCH", "setpriv")


def _switches() -> bool:
    return bool(TOOL_UID) and str(os.getuid()) != TOOL_UID


def as_tool(argv: tuple) -> tuple:
    """argv run as the tools' uid, with no capability, when the server's uid is another."""
    if not _switches() or TOOL_SWITCH == "fork":
        return argv
    return ("setpriv", f"--reuid={TOOL_UID}", f"--regid={TOOL_GID}", "--clear-groups", "--inh-caps=-all",
            "--ambient-caps=-all", "--", *argv)


def _become_tool() -> None:
    # in the child between fork and exec (uvloop has no user=/group=): exec then leaves no capability
    os.setgroups([])
    os.setresgid(int(TOOL_GID), int(TOOL_GID), int(TOOL_GID))
    os.setresuid(int(TOOL_UID), int(TOOL_UID), int(TOOL_UID))


async def spawn(*argv, stdin=None, stdout=None, stderr=None, limit=1 << 16) -> asyncio.subprocess.Process:
    ids = {"preexec_fn": _become_tool} if _switches() and TOOL_SWITCH == "fork" else {}
    proc = await asyncio.create_subprocess_exec(
        *as_tool(argv), stdin=stdin, stdout=stdout, stderr=stderr, cwd=config.WORKSPACE, env=child_env(),
        start_new_session=True, limit=limit, **ids,
    )
    _LIVE.add(proc)
    return proc


def kill(proc, sig=signal.SIGKILL) -> None:
    """Signal the whole process group of ``proc`` (its pid is the group id)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    if sig == signal.SIGKILL:
        _LIVE.discard(proc)


def forget(proc) -> None:
    _LIVE.discard(proc)


def kill_all() -> None:
    for proc in list(_LIVE):
        kill(proc)
    _LIVE.clear()


class Capture:
    """Collects one pipe of a child into a bounded buffer, in the background."""

    def __init__(self, stream, cap: int = None):
        self.cap = config.MAX_OUTPUT if cap is None else cap
        self.buf = bytearray()
        self.dropped = 0
        self.task = asyncio.ensure_future(self._pump(stream))

    async def _pump(self, stream):
        try:
            while True:
                chunk = await stream.read(65536)
                if not chunk:
                    break
                room = self.cap - len(self.buf)
                if room > 0:
                    self.buf += chunk[:room]
                self.dropped += max(0, len(chunk) - max(room, 0))
        except (asyncio.CancelledError, ConnectionError, OSError):
            pass

    def text(self, since_last=False) -> str:
        """All output so far, or (``since_last``) only what arrived since the previous such call;
        consumed output is released, so the cap bounds unread output only."""
        data = bytes(self.buf)
        if since_last:
            self.buf.clear()
        out = data.decode("utf-8", errors="replace")
        if self.dropped:
            out += f"\n[... {self.dropped} more bytes of output dropped]"
            if since_last:
                self.dropped = 0
        return out

    async def finish(self, grace: float = 0.5) -> None:
        """Wait briefly for EOF (a background grandchild may hold the pipe open), then stop."""
        try:
            await asyncio.wait_for(asyncio.shield(self.task), grace)
        except (TimeoutError, asyncio.CancelledError):
            self.task.cancel()
