"""Undo a pause that raced with work: the checker decides from activity flushed up to a
second ago, so it can pause a node a request here has just started on. The replica holding
the work sees the "paused" event and thaws the node at once, and the request completes."""

from __future__ import annotations

import asyncio
import logging

from manager.replica.runtime import Runtime
from nodeops import sessions
from shared.errors import ManagerError
from shared.models import Event

log = logging.getLogger(__name__)


class Thawer:
    """Called with every event of the stream; one per replica."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self._tasks: set[asyncio.Task[None]] = set()  # referenced until done

    def __call__(self, ev: Event) -> None:
        if ev.type != "paused" or not self.rt.activity.busy(ev.node_id):
            return
        task = asyncio.get_running_loop().create_task(self._thaw(ev.node_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _thaw(self, node_id: str) -> None:
        try:
            await sessions.ensure_running(self.rt, node_id)
            log.info("node_thawed node_id=%s reason=paused_under_work", node_id[:12])
        except ManagerError as exc:
            log.warning("node_thaw_failed node_id=%s error=%s", node_id[:12], exc.detail)
