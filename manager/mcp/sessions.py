"""MCP sessions in Redis: an Mcp-Session-Id (2025-11-25) or a handle (2026-07-28) names one
ordinary session (a node made by nodeops.sessions.create), so any replica serves it.

Redis holds only a hash of the token, bound to the client's identity (its API key's hash):
a token presented with another key is unknown, and reading Redis yields no usable token.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import time
from dataclasses import dataclass

from manager.replica.runtime import Runtime
from nodeops import sessions
from shared.errors import ManagerError, NodeNotFound

TOUCH_EVERY = 60.0  # seconds between TTL renewals of one session by one replica
# a session's record is read from Redis at most this often per replica: ending it elsewhere
# releases its node, which the resolver learns at once, so a stale copy serves nothing more
CACHE_SECONDS = 2.0
CACHE_MAX = 50_000


@dataclass(frozen=True)
class McpSession:
    token_hash: str
    node_id: str  # the session's cookie value: what the resolver and nodeops take
    owner: str
    version: str
    kind: str  # "session" (Mcp-Session-Id) or "handle" (a 2026-07-28 tool argument)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class McpSessions:
    """Open, find and end MCP sessions; one per app."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self._touched: dict[str, float] = {}
        self._cache: dict[str, tuple[float, dict[str, str]]] = {}

    async def open(self, kind: str, version: str, owner: str, client: str) -> tuple[str, McpSession]:
        """A new node session and the token that names it (returned once, never stored)."""
        rt = self.rt
        rec = await sessions.create(rt, client=client)
        token = secrets.token_urlsafe(32)
        sess = McpSession(hash_token(token), rec.id, owner, version, kind)
        try:
            await rt.store.mcp.session_put(sess.token_hash, {
                "node_id": rec.id, "owner": owner, "version": version, "kind": kind,
                "created_at": f"{time.time():.3f}"}, rt.cfg.mcp.session_ttl_seconds)
        except ManagerError:
            with contextlib.suppress(ManagerError):
                await sessions.release(rt, rec.id)  # nobody could ever name this node: do not leak it
            raise
        return token, sess

    async def find(self, token: str, owner: str, kind: str) -> McpSession | None:
        """The session a token names for this client, or None (unknown, ended, or another's)."""
        if not token or len(token) > 256:
            return None
        h = hash_token(token)
        now = time.monotonic()
        hit = self._cache.get(h)
        if hit is not None and hit[0] > now:
            data: dict[str, str] | None = hit[1]
        else:
            data = await self.rt.store.mcp.session_get(h)
            if data:
                if len(self._cache) >= CACHE_MAX:
                    self._cache.clear()
                self._cache[h] = (now + CACHE_SECONDS, data)
        if not data or data.get("kind") != kind or data.get("owner", "") != owner:
            return None
        if now - self._touched.get(h, 0.0) > TOUCH_EVERY:
            self._touched[h] = now
            if len(self._touched) > 100_000:
                self._touched.clear()
            await self.rt.store.mcp.session_touch(h, self.rt.cfg.mcp.session_ttl_seconds)
        return McpSession(h, data.get("node_id", ""), owner, data.get("version", ""), kind)

    async def end(self, sess: McpSession) -> None:
        """Release the session's node and forget the token (either may be gone already)."""
        with contextlib.suppress(NodeNotFound):
            await sessions.release(self.rt, sess.node_id)
        await self.rt.store.mcp.session_delete(sess.token_hash)
        self._touched.pop(sess.token_hash, None)
        self._cache.pop(sess.token_hash, None)

    async def forget(self, sess: McpSession) -> None:
        """The node is gone (released elsewhere): the token names nothing any more."""
        await self.rt.store.mcp.session_delete(sess.token_hash)
        self._touched.pop(sess.token_hash, None)
        self._cache.pop(sess.token_hash, None)
