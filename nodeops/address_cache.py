"""The cache of node addresses the engine confirmed (nodeops/addresses.py says why it exists);
its own module so the context that holds it imports nothing that imports the context."""

from __future__ import annotations

from shared.engines.base import Address

LIMIT = 20000  # containers remembered per replica; beyond, the oldest are checked again


class ConfirmedAddresses:
    """container id -> the session it serves and the address the engine gave for it (bounded,
    oldest dropped first). Keyed by container and checked against the session too: a record may
    name another session's container at that container's true address."""

    def __init__(self) -> None:
        self._by_cid: dict[str, tuple[str, Address]] = {}

    def get(self, cid: str) -> tuple[str, Address] | None:
        """What the engine said for a container, if it is remembered."""
        return self._by_cid.get(cid)

    def put(self, cid: str, session_id: str, addr: Address) -> None:
        """Remember what the engine just said (inspect, start, restart) for a session's container."""
        self._by_cid.pop(cid, None)
        self._by_cid[cid] = (session_id, addr)
        if len(self._by_cid) > LIMIT:
            del self._by_cid[next(iter(self._by_cid))]

    def drop(self, cid: str) -> None:
        """Forget a container (gone, or no longer running)."""
        self._by_cid.pop(cid, None)
