"""The session lock: one caller at a time makes, restarts or removes a session's container.

Used with ``async with`` like redis-py's asyncio Lock; its Redis part (a key with an expiry,
released only by its holder) is Store.lock_session / unlock_session. Resumes wait for it; the
checker only tries it (a session being brought back is not idle).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from types import TracebackType
from typing import Self

from shared.errors import ManagerError, SessionBusy
from shared.store import Store

POLL_SECONDS = 0.05


class SessionLock:
    """A session's lock held by holder, expiring after ttl_seconds; acquire waits up to wait_seconds."""

    def __init__(self, store: Store, session_id: str, holder: str, ttl_seconds: float, *,
                 wait_seconds: float = 0.0) -> None:
        self.store = store
        self.session_id = session_id
        self.holder = holder
        self.ttl_ms = int(ttl_seconds * 1000)
        self.wait_seconds = wait_seconds

    async def acquire(self) -> bool:
        """Take the lock, polling until wait_seconds have passed; whether it was taken."""
        deadline = time.monotonic() + self.wait_seconds
        while not await self.store.lock_session(self.session_id, self.holder, self.ttl_ms):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(POLL_SECONDS)
        return True

    async def release(self) -> None:
        """Let the lock go if it is still ours (it expires by itself if Redis cannot be reached)."""
        with contextlib.suppress(ManagerError):
            await self.store.unlock_session(self.session_id, self.holder)

    async def __aenter__(self) -> Self:
        if not await self.acquire():
            raise SessionBusy()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.release()


CAPTURE_SECONDS = 120.0  # a workspace copy's lock expires after this even if its holder died


def capture_lock(store: Store, session_id: str, holder: str, wait_seconds: float = 0.0) -> SessionLock:
    """Held while a session's workspace is copied (fork, snapshot). Stop and release wait for it:
    a file system unmounted while frozen stays frozen, and the next mount of it would hang."""
    # its own key (the session lock's, suffixed): the session lock is held for whole resumes
    return SessionLock(store, f"{session_id}:capture", holder, CAPTURE_SECONDS, wait_seconds=wait_seconds)


async def wait_capture(store: Store, session_id: str, holder: str) -> None:
    """Return once no copy of the session's workspace is being taken (SessionBusy past the lock's life)."""
    async with capture_lock(store, session_id, holder, wait_seconds=CAPTURE_SECONDS):
        pass
