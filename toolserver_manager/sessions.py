"""A session: one node, its tools, files and events."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from email.message import Message
from pathlib import Path
from typing import Any

import httpx
import msgspec

from toolserver_manager.errors import ConnectionFailed, ForkIncomplete, InvalidSession, ToolServerError
from toolserver_manager.events import EventStream
from toolserver_manager.models import AvailableTools, CookieInfo, Download, SnapshotInfo, ToolResult
from toolserver_manager.transport import CHUNK, DEFAULT_URL, AsyncBase, Dest, OnExit, Source


class AsyncSession(AsyncBase):
    """One client session = one node. ``async with`` creates it (unless ``node_id`` is given) and,
    on exit, releases it (``on_exit="release"``), stops it (``"close"``) or leaves it (``"keep"``).
    """

    def __init__(self, url: str = DEFAULT_URL, *, node_id: str | None = None, on_exit: OnExit = "release",
                 creation_timeout: float = 300.0, snapshot: str | None = None, **kwargs: Any) -> None:
        if on_exit not in ("release", "close", "keep"):
            raise ValueError(f"on_exit must be release, close or keep, not {on_exit!r}")
        super().__init__(url, **kwargs)
        self.on_exit: OnExit = on_exit
        self.creation_timeout = creation_timeout
        self.snapshot_name = snapshot  # start() makes the node from this snapshot
        self._kwargs = {"on_exit": on_exit, "creation_timeout": creation_timeout, **kwargs}  # for forks
        self.info: CookieInfo | None = None
        self._node_id: str | None = None
        if node_id:
            self._set_node(node_id)

    @classmethod
    async def create(cls, url: str = DEFAULT_URL, **kwargs: Any) -> AsyncSession:
        """A started session (its node is ready)."""
        s = cls(url, **kwargs)
        try:
            await s.start()
        except BaseException:
            await s.shutdown()
            raise
        return s

    @property
    def node_id(self) -> str | None:
        """The session's node (container) id: the ``node_id`` cookie."""
        return self._node_id

    def _set_node(self, node_id: str) -> None:
        self._node_id = node_id
        self._http.headers["Cookie"] = f"node_id={node_id}"

    def _need_node(self) -> str:
        if not self._node_id:
            raise InvalidSession("invalid node_id: None (the session was not started)")
        return self._node_id

    async def __aenter__(self) -> AsyncSession:
        if not self._node_id:
            try:
                await self.start()
            except BaseException:
                await self.shutdown()
                raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            if self._node_id and self.on_exit != "keep":
                with contextlib.suppress(InvalidSession):
                    await (self.release() if self.on_exit == "release" else self.close())
        finally:
            await self.shutdown()

    async def start(self) -> CookieInfo:
        """Create the node (``POST /get_cookie``) and keep its ``node_id`` for the session's life."""
        if self._node_id:
            raise ToolServerError(f"the session already has node {self._node_id}")
        extra: dict[str, Any] = {"json": {"snapshot": self.snapshot_name}} if self.snapshot_name else {}
        resp = await self._send("POST", "/get_cookie", op="session", retry=False, timeout=self.creation_timeout,
                                **extra)
        node_id = resp.cookies.get("node_id")
        if not node_id:
            raise ToolServerError("/get_cookie answered without a node_id cookie", resp.status_code)
        body = resp.json() if resp.content else {}
        body = body if isinstance(body, dict) else {}
        self.info = CookieInfo(node_id=node_id, message=str(body.get("message", "")),
                               version=str(body.get("version", "")), server=resp.headers.get("server", ""))
        self._set_node(node_id)
        return self.info

    async def _session_op(self, path: str) -> str:
        self._need_node()
        text = await self._json("POST", path, op="session", retry=False)
        if isinstance(text, str) and text.startswith("invalid node_id"):
            raise InvalidSession(text, 200)
        return str(text)

    async def close(self) -> str:
        """Stop the node (``/close_session``); a later call or ``reconnect()`` starts it again."""
        return await self._session_op("/close_session")

    async def reconnect(self) -> str:
        """Restart the node and wait until it answers (``/reconnect_session``)."""
        return await self._session_op("/reconnect_session")

    async def release(self) -> str:
        """Kill and remove the node; the session is invalid afterwards."""
        return await self._session_op("/release_session")

    async def fork(self, count: int = 1) -> list[AsyncSession]:
        """Copy this session into ``count`` new ones (its workspace at one instant; not its processes
        or ``/tmp``), started and ready; each is a session of its own (``on_exit`` as this one's).
        ForkIncomplete, with the copies that exist, when some could not be made."""
        self._need_node()
        try:
            body = await self._json("POST", "/fork_session", op="session", retry=False, json={"count": count},
                                    timeout=self.creation_timeout)
        except ToolServerError as exc:
            made = exc.extra.get("sessions")
            if isinstance(made, list):
                raise ForkIncomplete(exc.detail, exc.status_code, [self._copy(i) for i in made]) from exc
            raise
        return [self._copy(i) for i in body["sessions"]]

    def _copy(self, node_id: str) -> AsyncSession:
        return AsyncSession(self.url, node_id=node_id, **self._kwargs)

    async def snapshot(self, name: str) -> SnapshotInfo:
        """Save this session's workspace as the snapshot ``name`` (immutable; 409 if the name is taken)."""
        self._need_node()
        resp = await self._send("POST", "/snapshot_session", op="session", retry=False, json={"name": name},
                                timeout=self.creation_timeout)
        return msgspec.json.decode(resp.content, type=SnapshotInfo, strict=False)

    async def snapshots(self) -> list[SnapshotInfo]:
        """The snapshots this client keeps."""
        resp = await self._send("GET", "/snapshots", op="session", retry=False)
        return msgspec.convert(resp.json()["snapshots"], list[SnapshotInfo], strict=False)

    async def delete_snapshot(self, name: str) -> None:
        """Delete one of this client's snapshots (sessions made from it keep their files)."""
        await self._send("DELETE", f"/snapshots/{name}", op="session", retry=False)

    async def execute_tool(self, tool_name: str, arguments: dict[str, Any] | str | None = None,
                           env_name: str | None = None, *, timeout: float | None = None) -> ToolResult:
        """Run a tool on the node; raises ToolNotFound, BadArguments, ToolFailed, NotReady, ..."""
        self._need_node()
        payload: dict[str, Any] = {"tool_name": tool_name, "arguments": arguments if arguments is not None else {}}
        if env_name is not None:
            payload["env_name"] = env_name
        extra = {"timeout": timeout} if timeout is not None else {}
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        output = await self._json("POST", "/execute_tool", op="tool", json=payload, **extra)
        return ToolResult(tool_name=tool_name, output=output, env_name=env_name, elapsed=loop.time() - t0)

    async def get_available_tools(self) -> AvailableTools:
        """The node's envs and tools with their JSON schemas."""
        self._need_node()
        resp = await self._send("POST", "/get_available_tools", op="tool")
        return msgspec.json.decode(resp.content, type=AvailableTools, strict=False)

    async def call(self, path: str, payload: dict[str, Any] | None = None) -> Any:
        """POST JSON to any proxied node path (e.g. ``/retrieving_tools``) and return its JSON."""
        self._need_node()
        return await self._json("POST", path, op="tool", json=payload if payload is not None else {})

    async def upload_file(self, source: Source, remote_name: str | None = None) -> str:
        """Stream a file (path or binary file object) into the node's workspace as ``remote_name``."""
        self._need_node()
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            name = remote_name or path.name

            def build(stack: contextlib.ExitStack) -> dict[str, Any]:
                fh = stack.enter_context(open(path, "rb"))  # noqa: SIM115  (the stack closes it)
                return {"files": {"file": (name, fh, "application/octet-stream")}}

            return _message(await self._json("POST", "/upload_file", op="file", build=build))
        fobj = source
        name = remote_name or os.path.basename(str(getattr(fobj, "name", "") or "")) or "upload.bin"
        try:
            start = fobj.tell() if fobj.seekable() else None
        except (OSError, AttributeError, ValueError):
            start = None

        def build_obj(stack: contextlib.ExitStack) -> dict[str, Any]:
            if start is not None:
                fobj.seek(start)
            return {"files": {"file": (name, fobj, "application/octet-stream")}}

        return _message(await self._json("POST", "/upload_file", op="file", build=build_obj,
                                          retry=start is not None))

    async def download_file(self, file_path: str, dest: Dest, *, file_type: str | None = None) -> Download:
        """Stream a workspace file to ``dest`` (a path, a directory, or a binary file object)."""
        self._need_node()
        payload: dict[str, Any] = {"file_path": file_path}
        if file_type:
            payload["file_type"] = file_type
        return await self._download("/download_file", payload, dest, os.path.basename(file_path) or "download")

    async def download_workspace(self, dest: Dest) -> Download:
        """Stream the whole workspace as a zip archive to ``dest``."""
        self._need_node()
        return await self._download("/download_workspace", None, dest, "workspace.zip")

    async def _download(self, path: str, payload: dict[str, Any] | None, dest: Dest, default_name: str) -> Download:
        kwargs: dict[str, Any] = {"json": payload} if payload is not None else {}
        resp = await self._send("POST", path, op="file", stream=True, **kwargs)
        try:
            media = resp.headers.get("content-type", "")
            filename = _filename(resp.headers.get("content-disposition", "")) or default_name
            if not isinstance(dest, (str, os.PathLike)):
                size = 0
                async for chunk in resp.aiter_bytes(CHUNK):
                    dest.write(chunk)
                    size += len(chunk)
                return Download(path=None, size=size, media_type=media, filename=filename)
            target = Path(dest)
            if target.is_dir() or str(dest).endswith(os.sep):
                target = target / os.path.basename(filename)
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
            size = 0
            try:
                with os.fdopen(fd, "wb") as fh:
                    async for chunk in resp.aiter_bytes(CHUNK):
                        fh.write(chunk)
                        size += len(chunk)
                os.replace(tmp, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            return Download(path=str(target), size=size, media_type=media, filename=filename)
        except httpx.TransportError as exc:
            raise ConnectionFailed(f"download of {path} interrupted: {exc or type(exc).__name__}") from exc
        finally:
            await resp.aclose()

    def watch_events(self, last_event_id: str | None = None, *, ping_interval: float | None = 20.0,
                     resume_attempts: int = 5) -> EventStream:
        """This session's node events (created, ready, stopped, restarted, released, ...).

        ``last_event_id`` replays what followed that id (``"0"`` for everything still stored).
        """
        headers = {"Cookie": f"node_id={self._need_node()}"}
        return EventStream(self, {}, headers, last_event_id=last_event_id, ping_interval=ping_interval,
                           resume_attempts=resume_attempts)


AsyncToolServer = AsyncSession


def _message(data: Any) -> str:
    return str(data.get("message", data)) if isinstance(data, dict) else str(data)


def _filename(disposition: str) -> str:
    if not disposition:
        return ""
    msg = Message()
    msg["content-disposition"] = disposition
    name = msg.get_filename()
    return os.path.basename(name) if name else ""
