"""Client for toolserver-manager (and XAgent's ToolServerManager): sessions, tools, files, events, admin.

Async classes do the work (``AsyncSession``, ``AsyncAdmin``); the sync ones (``Session``, ``Admin``)
run the same code on a private event loop thread, so they also work inside a running loop.

    async with AsyncSession("http://127.0.0.1:8080") as s:       # POST /get_cookie
        r = await s.execute_tool("shell_command_executor", {"command": "echo hi"})
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Future
from email.message import Message
from http.cookiejar import CookieJar, DefaultCookiePolicy
from pathlib import Path
from typing import IO, Any, Literal, TypeVar
from urllib.parse import urlencode, urlsplit, urlunsplit

import httpx
import msgspec
import websockets
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from toolserver_manager.models import (
    AvailableTools,
    CookieInfo,
    Download,
    DrainState,
    Engines,
    Event,
    Lease,
    NodeDetail,
    NodeList,
    Replica,
    ToolResult,
)

T = TypeVar("T")
Source = str | os.PathLike[str] | IO[bytes]
Dest = str | os.PathLike[str] | IO[bytes]
OnExit = Literal["release", "close", "keep"]
DEFAULT_URL = "http://127.0.0.1:8080"
CHUNK = 1 << 16


# --- errors -------------------------------------------------------------------------------------
class ToolServerError(Exception):
    """Any failure; ``status_code`` is the HTTP status (None without one), ``detail`` the server's."""

    def __init__(self, detail: Any, status_code: int | None = None) -> None:
        self.detail = detail
        self.status_code = status_code
        text = detail if isinstance(detail, str) else json.dumps(detail, default=str)
        super().__init__(f"{status_code} {text}" if status_code is not None else text)


class ConnectionFailed(ToolServerError):
    """The manager could not be reached (connection refused, DNS, TLS, reset)."""


class RequestTimeout(ToolServerError):
    """The manager accepted the connection but did not answer in time."""


class Unauthorized(ToolServerError):
    """The admin token is missing (401) or wrong (403)."""


class NodeNotFound(ToolServerError):
    """No such node (admin API), or the session's node is unknown."""


class InvalidSession(NodeNotFound):
    """The session's ``node_id`` is missing, unknown or released."""


class ToolNotFound(ToolServerError):
    """The node has no such tool or env (404)."""


class BadArguments(ToolServerError):
    """The node refused the request's format or arguments (422)."""


class ToolFailed(ToolServerError):
    """The tool ran and failed (500); ``detail`` holds its error output."""


class FileNotFound(ToolServerError):
    """The file is not in the node's workspace (404 on download)."""


class Unavailable(ToolServerError):
    """503: node not running or not responding, creation timeout, Redis or engine down."""


class NotReady(Unavailable):
    """450: the node asks to retry later."""


class EventStreamError(ToolServerError):
    """The ``/ws/events`` server refused the watch or sent an error message."""


def error_for(status: int, detail: Any, op: str = "") -> ToolServerError:
    """The typed exception for an HTTP error status; ``op`` is tool, file, session, admin or ''."""
    text = detail if isinstance(detail, str) else str(detail)
    if text.startswith("invalid node_id"):
        return InvalidSession(detail, status)
    if status in (401, 403) and op == "admin":
        return Unauthorized(detail, status)
    if status == 404:
        if op == "tool":
            return ToolNotFound(detail, status)
        if op == "file":
            return FileNotFound(detail, status)
        if op == "admin" and text.startswith("no node"):
            return NodeNotFound(detail, status)
    if status == 422:
        return BadArguments(detail, status)
    if status == 450:
        return NotReady(detail, status)
    if status == 500 and op == "tool":
        return ToolFailed(detail, status)
    if status == 503:
        return Unavailable(detail, status)
    return ToolServerError(detail, status)


def _detail(content: bytes) -> Any:
    try:
        data = json.loads(content)
    except ValueError:
        return content.decode("utf-8", "replace")[:2000] or "(empty body)"
    return data["detail"] if isinstance(data, dict) and "detail" in data else data


def _retryable(exc: ToolServerError) -> bool:
    text = exc.detail if isinstance(exc.detail, str) else ""
    return isinstance(exc, Unavailable) and exc.status_code == 503 and (
        text.startswith("node is not running") or text.startswith("node is not responding"))


class _NoCookies(DefaultCookiePolicy):
    """Refuses every Set-Cookie: the session's node_id is sent explicitly and never replaced."""

    def set_ok(self, cookie: Any, request: Any) -> bool:
        return False


# --- the shared async core ----------------------------------------------------------------------
class _AsyncBase:
    def __init__(self, url: str = DEFAULT_URL, *, timeout: float | httpx.Timeout = 600.0,
                 connect_timeout: float = 10.0, retries: int = 5, backoff: float = 0.5,
                 max_backoff: float = 10.0, headers: dict[str, str] | None = None,
                 transport: httpx.AsyncBaseTransport | None = None, verify: Any = True,
                 trust_env: bool = True) -> None:
        self.url = url.rstrip("/")
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.trust_env = trust_env
        tmo = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout, connect=connect_timeout)
        self._headers: dict[str, str] = dict(headers or {})
        self._http = httpx.AsyncClient(base_url=self.url, timeout=tmo, headers=self._headers,
                                       cookies=CookieJar(policy=_NoCookies()), transport=transport,
                                       verify=verify, trust_env=trust_env, follow_redirects=False)

    async def shutdown(self) -> None:
        """Close the HTTP connections (the node is left as it is)."""
        await self._http.aclose()

    def _delay(self, attempt: int) -> float:
        base = min(self.backoff * (2 ** attempt), self.max_backoff)
        return base * (0.5 + random.random() / 2)

    async def _send(self, method: str, path: str, *, op: str = "", stream: bool = False,
                    build: Callable[[contextlib.ExitStack], dict[str, Any]] | None = None,
                    retry: bool = True, **kwargs: Any) -> httpx.Response:
        """Send with retries on 503 "node is not running/responding"; raise the typed error on >= 400.

        ``build`` makes fresh request arguments per attempt (a re-opened upload); with ``stream``
        the caller reads and closes the response.
        """
        attempt = 0
        while True:
            with contextlib.ExitStack() as stack:
                args = dict(kwargs)
                if build is not None:
                    args.update(build(stack))
                try:
                    req = self._http.build_request(method, path, **args)
                    resp = await self._http.send(req, stream=True)
                except httpx.TimeoutException as exc:
                    raise RequestTimeout(f"{method} {self.url}{path}: timed out ({type(exc).__name__})") from exc
                except httpx.TransportError as exc:
                    raise ConnectionFailed(f"cannot connect to {self.url}: {exc or type(exc).__name__}") from exc
                if resp.status_code >= 400:
                    try:
                        body = await resp.aread()
                    finally:
                        await resp.aclose()
                    err = error_for(resp.status_code, _detail(body), op)
                    if retry and attempt < self.retries and _retryable(err):
                        await asyncio.sleep(self._delay(attempt))
                        attempt += 1
                        continue
                    raise err
                if not stream:
                    try:
                        await resp.aread()
                    finally:
                        await resp.aclose()
                return resp

    async def _json(self, method: str, path: str, *, op: str = "", **kwargs: Any) -> Any:
        resp = await self._send(method, path, op=op, **kwargs)
        try:
            return resp.json()
        except ValueError as exc:
            raise ToolServerError(f"{path}: not a JSON answer: {resp.text[:200]!r}", resp.status_code) from exc

    def _ws_url(self, path: str, query: dict[str, str]) -> str:
        parts = urlsplit(self.url)
        scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
        return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + path, urlencode(query), ""))

    def _stream_events(self, query: dict[str, str], headers: dict[str, str], last_event_id: str | None,
                       ping_interval: float | None, resume_attempts: int) -> "EventStream":
        return EventStream(self, query, headers, last_event_id=last_event_id, ping_interval=ping_interval,
                           resume_attempts=resume_attempts)


# --- event stream -------------------------------------------------------------------------------
class _Watch:
    """What the background reader of an EventStream shares with it (never the stream itself,
    so a dropped stream can be garbage-collected and its reader cancelled)."""

    def __init__(self, base: _AsyncBase, query: dict[str, str], headers: dict[str, str], resume_id: str | None,
                 ping_interval: float | None, resume_attempts: int, open_timeout: float, buffer: int) -> None:
        self.base = base
        self.query = query
        self.headers = headers
        self.resume_id = resume_id  # the last event received: where a reconnection resumes
        self.ping_interval = ping_interval
        self.resume_attempts = resume_attempts
        self.open_timeout = open_timeout
        self.queue: asyncio.Queue[Event | BaseException | None] = asyncio.Queue(buffer)
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.handshake: Any = None
        self.connections = 0
        self.pending_pongs = 0

    def url(self) -> str:
        q = dict(self.query)
        if self.resume_id:
            q["last_event_id"] = self.resume_id
        return self.base._ws_url("/ws/events", q)

    async def connect(self) -> Any:
        try:
            return await websockets.connect(self.url(), additional_headers=self.headers,
                                            open_timeout=self.open_timeout,
                                            proxy=True if self.base.trust_env else None)
        except InvalidStatus as exc:
            resp = exc.response
            raise error_for(resp.status_code, _detail(resp.body or b""), "admin") from exc
        except (OSError, InvalidHandshake, asyncio.TimeoutError) as exc:
            raise ConnectionFailed(f"cannot connect to {self.base.url}/ws/events: "
                                   f"{exc or type(exc).__name__}") from exc

    async def shake(self, ws: Any) -> None:
        """Read the first message: ``{"status":"connect","success":true,...}`` or raise."""
        try:
            raw = await asyncio.wait_for(ws.recv(), self.open_timeout)
            msg = json.loads(raw)
        except (ConnectionClosed, asyncio.TimeoutError, ValueError) as exc:
            raise EventStreamError(f"no handshake from /ws/events: {exc!r}") from exc
        if not isinstance(msg, dict) or msg.get("status") != "connect":
            raise EventStreamError(f"unexpected first message: {str(raw)[:200]}")
        if not msg.get("success"):
            text = str(msg.get("message") or "watch refused")
            if text.startswith("invalid node_id"):
                raise InvalidSession(text)
            if "token" in text:
                raise Unauthorized(text)
            raise EventStreamError(text)
        self.handshake = msg.get("data")

    async def ping(self, ws: Any) -> None:
        self.pending_pongs += 1
        await ws.send('{"type":"ping"}')

    async def pinger(self, ws: Any, every: float) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await asyncio.sleep(every)
                await self.ping(ws)

    def fail(self, exc: BaseException | None) -> None:
        """End the stream: a handshake error goes to start(), a later one to the consumer."""
        if exc is not None and not self.ready.done():
            self.ready.set_exception(exc)
            return
        if not self.ready.done():
            self.ready.set_result(None)
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(exc)
        if self.queue.full():  # make room for the end marker: the consumer must learn the stream ended
            with contextlib.suppress(asyncio.QueueEmpty):
                self.queue.get_nowait()
            self.queue.put_nowait(exc)

    async def run(self) -> None:
        """Connect, read, answer keep-alives, and resume after drops; runs as a task."""
        failures = 0
        while True:
            try:
                ws = await self.connect()
            except ToolServerError as exc:
                if self.connections == 0 or failures >= self.resume_attempts:
                    self.fail(exc)
                    return
                failures += 1
                await asyncio.sleep(self.base._delay(failures - 1))
                continue
            pinger: asyncio.Task[None] | None = None
            try:
                try:
                    await self.shake(ws)
                except ToolServerError as exc:
                    # on a resume, a node that is gone now simply ends its session's stream
                    self.fail(None if self.connections and isinstance(exc, InvalidSession) else exc)
                    return
                self.connections += 1
                failures = 0
                self.pending_pongs = 0
                if not self.ready.done():
                    self.ready.set_result(None)
                if self.ping_interval:
                    pinger = asyncio.create_task(self.pinger(ws, self.ping_interval))
                async for raw in ws:
                    try:
                        msg = json.loads(raw)
                    except ValueError:
                        continue
                    kind = msg.get("type") if isinstance(msg, dict) else None
                    if kind == "pong":
                        if self.pending_pongs > 0:
                            self.pending_pongs -= 1  # the answer to our ping
                        else:
                            await self.ping(ws)  # the server's keep-alive: show that we are here
                    elif kind == "event":
                        ev = msgspec.convert(msg, Event, strict=False)
                        if ev.id:
                            self.resume_id = ev.id
                        await self.queue.put(ev)
                    elif kind == "gap":
                        await self.queue.put(Event(event="gap", detail=str(msg.get("message", ""))))
                    elif kind == "error":
                        self.fail(EventStreamError(str(msg.get("message", msg))))
                        return
            except ConnectionClosed:
                pass
            finally:
                if pinger is not None:
                    pinger.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await pinger
                with contextlib.suppress(Exception):
                    await ws.close()
            # the server closed the socket (shutdown, slow reader, silence): resume after the last event
            if failures >= self.resume_attempts:
                self.fail(None if self.resume_attempts == 0 else ConnectionFailed(
                    f"event stream closed and could not be resumed after {failures} attempts"))
                return
            failures += 1
            await asyncio.sleep(self.base._delay(failures - 1))


class EventStream:
    """Async iterator of ``Event`` over ``/ws/events``, read by a background task that answers the
    server's keep-alives and resumes after drops with ``last_event_id``.

    ``async with`` waits for the handshake (raising on ``success: false``) and closes the socket on exit.
    """

    def __init__(self, base: _AsyncBase, query: dict[str, str], headers: dict[str, str], *,
                 last_event_id: str | None = None, ping_interval: float | None = 20.0,
                 resume_attempts: int = 5, open_timeout: float = 10.0, buffer: int = 1000) -> None:
        self._args = (base, {k: v for k, v in query.items() if v}, headers, last_event_id, ping_interval,
                      resume_attempts, open_timeout, buffer)
        self._watch: _Watch | None = None
        self._task: asyncio.Task[None] | None = None
        self._last = last_event_id
        self._gen = self._consume()

    @property
    def last_event_id(self) -> str | None:
        """The id of the last event handed out: pass it to a new watch to resume after it."""
        return self._last

    @property
    def handshake(self) -> Any:
        """The handshake's ``data``: the node record (session watch) or the admin scope."""
        return self._watch.handshake if self._watch else None

    @property
    def connections(self) -> int:
        """How many times the socket was opened (1 + resumes)."""
        return self._watch.connections if self._watch else 0

    async def start(self) -> "EventStream":
        """Open the socket and wait for the handshake (iteration does this by itself)."""
        if self._watch is None:
            self._watch = _Watch(*self._args)
            self._task = asyncio.create_task(self._watch.run(), name="toolserver-events")
        await asyncio.shield(self._watch.ready)
        return self

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._gen

    async def __anext__(self) -> Event:
        return await self._gen.__anext__()

    async def _consume(self) -> AsyncIterator[Event]:
        try:
            await self.start()
            assert self._watch is not None
            while True:
                item = await self._watch.queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                if item.id:
                    self._last = item.id
                yield item
        finally:
            await self._stop()

    async def _stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def aclose(self) -> None:
        """Close the socket and end the iteration."""
        await self._gen.aclose()
        await self._stop()

    async def __aenter__(self) -> "EventStream":
        try:
            return await self.start()
        except BaseException:
            await self.aclose()
            raise

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


# --- sessions -----------------------------------------------------------------------------------
class AsyncSession(_AsyncBase):
    """One client session = one node. ``async with`` creates it (unless ``node_id`` is given) and,
    on exit, releases it (``on_exit="release"``), stops it (``"close"``) or leaves it (``"keep"``).
    """

    def __init__(self, url: str = DEFAULT_URL, *, node_id: str | None = None, on_exit: OnExit = "release",
                 creation_timeout: float = 300.0, **kwargs: Any) -> None:
        if on_exit not in ("release", "close", "keep"):
            raise ValueError(f"on_exit must be release, close or keep, not {on_exit!r}")
        super().__init__(url, **kwargs)
        self.on_exit: OnExit = on_exit
        self.creation_timeout = creation_timeout
        self.info: CookieInfo | None = None
        self._node_id: str | None = None
        if node_id:
            self._set_node(node_id)

    @classmethod
    async def create(cls, url: str = DEFAULT_URL, **kwargs: Any) -> "AsyncSession":
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

    async def __aenter__(self) -> "AsyncSession":
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
        resp = await self._send("POST", "/get_cookie", op="session", retry=False, timeout=self.creation_timeout)
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
                fh = stack.enter_context(open(path, "rb"))
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
        return self._stream_events({}, headers, last_event_id, ping_interval, resume_attempts)


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


# --- admin --------------------------------------------------------------------------------------
class AsyncAdmin(_AsyncBase):
    """The admin API under ``/admin`` (``Authorization: Bearer <token>``)."""

    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, *, timeout: float = 30.0,
                 **kwargs: Any) -> None:
        headers = dict(kwargs.pop("headers", None) or {})
        if token:
            headers["Authorization"] = f"Bearer {token}"
        super().__init__(url, timeout=timeout, headers=headers, **kwargs)
        self._token = token

    async def __aenter__(self) -> "AsyncAdmin":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    async def _get(self, path: str, params: dict[str, Any] | None = None) -> httpx.Response:
        p = {k: str(v) for k, v in (params or {}).items() if v is not None}
        return await self._send("GET", path, op="admin", params=p, retry=False)

    async def list_nodes(self, *, manager_id: str | None = None, status: str | None = None,
                         min_idle_seconds: int | None = None, limit: int | None = None,
                         offset: int | None = None) -> NodeList:
        """Node records, filtered and paged."""
        resp = await self._get("/admin/nodes", {"manager_id": manager_id, "status": status,
                                                "min_idle_seconds": min_idle_seconds, "limit": limit,
                                                "offset": offset})
        return msgspec.json.decode(resp.content, type=NodeList, strict=False)

    async def inspect_node(self, node_id: str) -> NodeDetail:
        """One node: record, container state, stats."""
        resp = await self._get(f"/admin/nodes/{node_id}")
        return msgspec.json.decode(resp.content, type=NodeDetail, strict=False)

    async def release_nodes(self, *node_ids: str) -> dict[str, str]:
        """Release nodes; maps each id to ``released`` or the reason it was not."""
        resp = await self._send("POST", "/admin/nodes/release", op="admin", retry=False,
                                json={"node_ids": list(node_ids)})
        return dict(resp.json()["results"])

    async def replicas(self) -> list[Replica]:
        """The live manager replicas."""
        resp = await self._get("/admin/replicas")
        return msgspec.convert(resp.json()["replicas"], list[Replica], strict=False)

    async def leases(self) -> list[Lease]:
        """The checker lease of each manager_id."""
        resp = await self._get("/admin/leases")
        return msgspec.convert(resp.json()["leases"], list[Lease], strict=False)

    async def drain(self, manager_id: str, on: bool = True) -> DrainState:
        """Stop placing new nodes on a manager_id (``on=False`` resumes)."""
        resp = await self._send("POST" if on else "DELETE", f"/admin/managers/{manager_id}/drain",
                                op="admin", retry=False)
        return msgspec.json.decode(resp.content, type=DrainState, strict=False)

    async def engines(self) -> Engines:
        """Each live manager_id's engine summary."""
        resp = await self._get("/admin/engines")
        return msgspec.json.decode(resp.content, type=Engines, strict=False)

    async def config(self) -> dict[str, Any]:
        """The answering replica's configuration, secrets redacted."""
        return dict((await self._get("/admin/config")).json())

    def watch_events(self, manager_id: str | None = None, last_event_id: str | None = None, *,
                     ping_interval: float | None = 20.0, resume_attempts: int = 5) -> EventStream:
        """Every node's events (or one manager_id's)."""
        if not self._token:
            raise Unauthorized("missing admin token (Authorization: Bearer <token>)", 401)
        headers = {"Authorization": f"Bearer {self._token}"}
        return self._stream_events({"manager_id": manager_id or ""}, headers, last_event_id, ping_interval,
                                   resume_attempts)


# --- sync wrappers ------------------------------------------------------------------------------
class _Portal:
    """A private event loop on a daemon thread that runs the async client's coroutines."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="toolserver-client", daemon=True)
        self._thread.start()

    def call(self, coro: Awaitable[T]) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]
        try:
            return fut.result()
        except BaseException:
            fut.cancel()
            raise

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class SyncEventStream:
    """Blocking iterator over an ``EventStream``; ``close()`` (or ``with``) ends it."""

    def __init__(self, portal: _Portal, stream: EventStream) -> None:
        self._portal = portal
        self.stream = stream

    @property
    def last_event_id(self) -> str | None:
        return self.stream.last_event_id

    @property
    def handshake(self) -> Any:
        return self.stream.handshake

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        try:
            return self._portal.call(self.stream.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        self._portal.call(self.stream.aclose())

    def start(self) -> "SyncEventStream":
        """Open the socket and wait for the handshake."""
        self._portal.call(self.stream.start())
        return self

    def __enter__(self) -> "SyncEventStream":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


class _SyncBase:
    _a: Any

    def __init__(self, factory: Callable[[], Any]) -> None:
        self._portal = _Portal()

        async def make() -> Any:
            return factory()

        self._a = self._portal.call(make())

    def _run(self, coro: Awaitable[T]) -> T:
        return self._portal.call(coro)

    @property
    def url(self) -> str:
        return str(self._a.url)

    def shutdown(self) -> None:
        """Close the HTTP connections and the private loop (the node is left as it is)."""
        if self._portal.loop.is_closed():
            return
        try:
            self._run(self._a.shutdown())
        finally:
            self._portal.stop()


class Session(_SyncBase):
    """Blocking ``AsyncSession``: same arguments, same methods without ``await``."""

    def __init__(self, url: str = DEFAULT_URL, **kwargs: Any) -> None:
        super().__init__(lambda: AsyncSession(url, **kwargs))

    @classmethod
    def create(cls, url: str = DEFAULT_URL, **kwargs: Any) -> "Session":
        """A started session (its node is ready)."""
        s = cls(url, **kwargs)
        try:
            s.start()
        except BaseException:
            s.shutdown()
            raise
        return s

    @property
    def node_id(self) -> str | None:
        return self._a.node_id  # type: ignore[no-any-return]

    @property
    def info(self) -> CookieInfo | None:
        return self._a.info  # type: ignore[no-any-return]

    def __enter__(self) -> "Session":
        if not self.node_id:
            try:
                self.start()
            except BaseException:
                self.shutdown()
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.node_id and self._a.on_exit != "keep":
                with contextlib.suppress(InvalidSession):
                    self.release() if self._a.on_exit == "release" else self.close()
        finally:
            self.shutdown()

    def start(self) -> CookieInfo:
        """Create the node (``POST /get_cookie``)."""
        return self._run(self._a.start())

    def close(self) -> str:
        """Stop the node (``/close_session``)."""
        return self._run(self._a.close())

    def reconnect(self) -> str:
        """Restart the node and wait until it answers."""
        return self._run(self._a.reconnect())

    def release(self) -> str:
        """Kill and remove the node; the session is invalid afterwards."""
        return self._run(self._a.release())

    def execute_tool(self, tool_name: str, arguments: dict[str, Any] | str | None = None,
                     env_name: str | None = None, *, timeout: float | None = None) -> ToolResult:
        """Run a tool on the node."""
        return self._run(self._a.execute_tool(tool_name, arguments, env_name, timeout=timeout))

    def get_available_tools(self) -> AvailableTools:
        """The node's envs and tools."""
        return self._run(self._a.get_available_tools())

    def call(self, path: str, payload: dict[str, Any] | None = None) -> Any:
        """POST JSON to any proxied node path."""
        return self._run(self._a.call(path, payload))

    def upload_file(self, source: Source, remote_name: str | None = None) -> str:
        """Stream a file into the workspace."""
        return self._run(self._a.upload_file(source, remote_name))

    def download_file(self, file_path: str, dest: Dest, *, file_type: str | None = None) -> Download:
        """Stream a workspace file to ``dest``."""
        return self._run(self._a.download_file(file_path, dest, file_type=file_type))

    def download_workspace(self, dest: Dest) -> Download:
        """Stream the workspace zip to ``dest``."""
        return self._run(self._a.download_workspace(dest))

    def watch_events(self, last_event_id: str | None = None, **kwargs: Any) -> SyncEventStream:
        """This session's node events, as a blocking iterator."""
        return SyncEventStream(self._portal, self._a.watch_events(last_event_id, **kwargs))


ToolServer = Session


class Admin(_SyncBase):
    """Blocking ``AsyncAdmin``."""

    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, **kwargs: Any) -> None:
        super().__init__(lambda: AsyncAdmin(url, token, **kwargs))

    def __enter__(self) -> "Admin":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def list_nodes(self, **filters: Any) -> NodeList:
        """Node records (filters: manager_id, status, min_idle_seconds, limit, offset)."""
        return self._run(self._a.list_nodes(**filters))

    def inspect_node(self, node_id: str) -> NodeDetail:
        return self._run(self._a.inspect_node(node_id))

    def release_nodes(self, *node_ids: str) -> dict[str, str]:
        return self._run(self._a.release_nodes(*node_ids))

    def replicas(self) -> list[Replica]:
        return self._run(self._a.replicas())

    def leases(self) -> list[Lease]:
        return self._run(self._a.leases())

    def drain(self, manager_id: str, on: bool = True) -> DrainState:
        return self._run(self._a.drain(manager_id, on))

    def engines(self) -> Engines:
        return self._run(self._a.engines())

    def config(self) -> dict[str, Any]:
        return self._run(self._a.config())

    def watch_events(self, manager_id: str | None = None, last_event_id: str | None = None,
                     **kwargs: Any) -> SyncEventStream:
        """Every node's events (or one manager_id's), as a blocking iterator."""
        return SyncEventStream(self._portal, self._a.watch_events(manager_id, last_event_id, **kwargs))
