"""The cluster-wide upkeep, one lease holder a period (checker.upkeep_seconds): what no one
manager_id's checker owns.

- Client counts recounted from the records. A client's quota spans manager_ids, so its count is
  a cache of its records and reservations that can end one off: a replica dying between the two
  steps of a creation on a cluster, a failover losing the count's last write (Redis replicates
  asynchronously), a replica counted dead that finishes its creation. A count is corrected only
  when nothing wrote it (its version) and its holdings did not change between two readings
  checker.recount_settle_seconds apart: a creation or a release under way moves one or the other,
  so an in-flight step is never taken for a lost one; a busy client's count waits for a quiet spell.
- Event streams of manager_ids gone (no replica's heartbeat, no session, no event for
  events.gone_stream_grace_seconds) removed; each is bounded, but 1,000 gone manager_ids kept
  1,000 of them. A resume from before a removal is told its events are gone (manager/events/ws.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass, field

from shared import metrics
from shared.config import Config
from shared.store import Store

log = logging.getLogger(__name__)


@dataclass
class UpkeepResult:
    """What one upkeep did: counts corrected (client -> (was, now)) and streams removed (manager_id -> last id)."""

    recounted: dict[str, tuple[int, int]] = field(default_factory=dict)
    streams_removed: dict[str, str] = field(default_factory=dict)


class Upkeep:
    """One replica's share of the cluster-wide upkeep."""

    def __init__(self, store: Store, cfg: Config) -> None:
        self.store = store
        self.cfg = cfg

    async def run(self) -> UpkeepResult:
        """One upkeep: recount, then remove gone streams."""
        out = UpkeepResult()
        out.recounted = await self.recount()
        out.streams_removed = await self.remove_gone_streams()
        return out

    async def recount(self) -> dict[str, tuple[int, int]]:
        """Correct the counts that disagree with the records, read twice settle seconds apart."""
        before = await self.store.client_tallies()
        held = await self.store.client_holdings()
        # a count of 0 with nothing held is a field to drop; a count off its holdings one to check
        suspects = {c for c in set(before) | set(held) if before.get(c, (0, 0))[0] != held.get(c, 0)
                    or (c in before and held.get(c, 0) == 0)}
        if not suspects:
            return {}
        await asyncio.sleep(self.cfg.checker.recount_settle_seconds)
        held_after = await self.store.client_holdings()
        after = await self.store.client_tallies()
        fixed: dict[str, tuple[int, int]] = {}
        for c in suspects:
            count, version = after.get(c, (0, 0))
            want = held_after.get(c, 0)
            if before.get(c, (0, 0)) != (count, version) or held.get(c, 0) != want:
                continue  # written, or its sessions changed, meanwhile: a later upkeep looks again
            if count == want and (want or c not in after):
                continue
            if await self.store.set_client_count(c, version, count, want) and count != want:
                fixed[c] = (count, want)
                metrics.CLIENT_COUNTS_CORRECTED.inc()
                log.warning("client_count_corrected client_hash=%s was=%d now=%d", _hash(c), count, want)
        return fixed

    async def remove_gone_streams(self) -> dict[str, str]:
        """Remove the event streams of manager_ids gone for the grace."""
        grace = self.cfg.events.gone_stream_grace_seconds
        quiet_since = time.time() - grace
        seen = await self.store.managers_seen()
        live = {r.manager_id for r in await self.store.live_replicas()}
        removed: dict[str, str] = {}
        for mid in await self.store.manager_ids():
            if mid in live or seen.get(mid, 0.0) > quiet_since:
                continue
            last = await self.store.remove_gone_stream(mid, quiet_since)
            if last is not None:
                removed[mid] = last
                metrics.EVENT_STREAMS_REMOVED.inc()
                log.info("event_stream_removed manager_id=%s last_id=%s", mid, last)
        return removed


def _hash(client: str) -> str:
    """A client identity for logs (it may be an API key)."""
    return hashlib.sha256(client.encode()).hexdigest()[:16]
