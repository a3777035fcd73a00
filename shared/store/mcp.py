"""MCP state shared by replicas: sessions (by token hash), the SSE streams of their calls with the
replica that runs each, cancellations, and the tool lists cached per image."""

from __future__ import annotations

from typing import cast

from shared.store.base import Entries, Part, as_mapping, redis_errors, text


class McpStore(Part):
    """MCP sessions, streams, cancellations and tool lists (``store.mcp``)."""

    async def session_put(self, token_hash: str, fields: dict[str, str], ttl: float) -> None:
        key = self.keys.mcp_session(token_hash)
        with redis_errors():
            async with self.redis.pipeline(transaction=True) as p:
                p.hset(key, mapping=as_mapping(fields))
                p.pexpire(key, int(ttl * 1000))
                await p.execute()

    async def session_get(self, token_hash: str) -> dict[str, str] | None:
        with redis_errors():
            data = await self.redis.hgetall(self.keys.mcp_session(token_hash))
        return {text(k): text(v) for k, v in data.items()} if data else None

    async def session_touch(self, token_hash: str, ttl: float) -> None:
        with redis_errors():
            await self.redis.pexpire(self.keys.mcp_session(token_hash), int(ttl * 1000))

    async def session_delete(self, token_hash: str) -> bool:
        """Forget an MCP session; False when it was already gone (another replica ended it)."""
        with redis_errors():
            return bool(await self.redis.delete(self.keys.mcp_session(token_hash)))

    async def stream_add(self, token_hash: str, stream_id: str, data: str, kind: str, ttl: float) -> str:
        """Append one SSE event (kind: a one-letter tag of the caller's) to a stream; its id is the
        entry id, and the stream expires ttl after its last event."""
        key = self.keys.mcp_stream(token_hash, stream_id)
        with redis_errors():
            async with self.redis.pipeline(transaction=True) as p:
                p.xadd(key, {"d": data, "k": kind}, maxlen=10000, approximate=True)
                p.pexpire(key, int(ttl * 1000))
                eid, _ = await p.execute()
        return text(eid)

    async def stream_read(self, token_hash: str, stream_id: str, after: str,
                              block_ms: int | None) -> list[tuple[str, str, str]]:
        """Events after an entry id as (id, data, kind); waits up to block_ms for one when given."""
        key = self.keys.mcp_stream(token_hash, stream_id)
        with redis_errors():
            if block_ms is None:
                rows = cast(Entries, await self.redis.xrange(key, min=f"({after}", max="+"))
            else:
                got = cast(list[tuple[bytes, Entries]], await self.redis.xread({key: after}, block=block_ms, count=100))
                rows = got[0][1] if got else []
        return [(text(eid), text(f.get(b"d", b"")), text(f.get(b"k", b""))) for eid, f in rows]

    async def stream_exists(self, token_hash: str, stream_id: str) -> bool:
        with redis_errors():
            return bool(await self.redis.exists(self.keys.mcp_stream(token_hash, stream_id)))

    async def stream_hold(self, token_hash: str, stream_id: str, replica_id: str, ttl: float) -> None:
        """Say (for ttl) that this replica still runs the stream's call."""
        with redis_errors():
            await self.redis.set(self.keys.mcp_stream_owner(token_hash, stream_id), replica_id,
                                 px=int(ttl * 1000))

    async def stream_let_go(self, token_hash: str, stream_id: str) -> None:
        with redis_errors():
            await self.redis.delete(self.keys.mcp_stream_owner(token_hash, stream_id))

    async def stream_held(self, token_hash: str, stream_id: str) -> bool:
        with redis_errors():
            return bool(await self.redis.exists(self.keys.mcp_stream_owner(token_hash, stream_id)))

    async def cancel(self, token_hash: str, request_id: str, ttl: float) -> None:
        with redis_errors():
            await self.redis.set(self.keys.mcp_cancel(token_hash, request_id), "1", px=int(ttl * 1000))

    async def cancelled(self, token_hash: str, request_id: str) -> bool:
        with redis_errors():
            return bool(await self.redis.exists(self.keys.mcp_cancel(token_hash, request_id)))

    async def tools_put(self, image: str, tools_json: str, ttl: float) -> None:
        with redis_errors():
            await self.redis.set(self.keys.mcp_tools(image), tools_json, px=int(ttl * 1000))

    async def tools_get(self, image: str) -> str | None:
        with redis_errors():
            v = await self.redis.get(self.keys.mcp_tools(image))
        return text(v) if v is not None else None
