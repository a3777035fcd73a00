"""The node's HTTP and WebSocket routes (XAgent ToolServerNode API) as a Starlette app."""

import json
import logging
import os
import stat
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute

from . import config, diag, paths, procs, registry
from .auth import RequireSecret
from .errors import NodeError

log = logging.getLogger("uvicorn.error")


class JSON(Response):
    media_type = "application/json"

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=False, allow_nan=False, default=str,
                          separators=(",", ":")).encode("utf-8")


def _error(status: int, detail) -> JSON:
    return JSON({"detail": detail}, status_code=status)


# --- request parsing ------------------------------------------------------------------------------
_MISSING = object()


async def _body(request) -> dict:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise NodeError(422, f"Malformed JSON body: {exc}") from None
    if not isinstance(data, dict):
        raise NodeError(422, "The JSON body must be an object")
    return data


def _field(data: dict, name: str, kind, default=_MISSING, *, nullable=False):
    value = data.get(name, _MISSING)
    if value is _MISSING or (value is None and default is not _MISSING):
        if default is _MISSING:
            raise NodeError(422, f"Field {name!r} is required")
        return default
    if value is None and nullable:
        return None
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is list:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    else:
        ok = isinstance(value, kind)
    if not ok:
        names = {str: "a string", int: "an integer", dict: "an object", list: "a list of strings"}
        raise NodeError(422, f"Field {name!r} must be {names.get(kind, kind.__name__)}")
    return value


# --- routes ---------------------------------------------------------------------------------------
async def root(request):
    return JSON({"message": "Hello World"})


async def get_available_tools(request):
    return JSON({
        "available_envs": registry.all_envs_json(),
        "available_tools": registry.all_tool_names(),
        "tools_json": registry.all_tools_json(),
    })


async def get_json_schema_for_tools(request):
    data = await _body(request)
    names = _field(data, "tool_names", list)
    found, missing = [], []
    for name in names:
        tool = registry.TOOLS.get(name)
        (found.append(tool.dict()) if tool is not None else missing.append(name))
    return JSON({"tools_json": found, "missing_tools": missing})


async def get_json_schema_for_envs(request):
    data = await _body(request)
    names = _field(data, "env_names", list)
    found, missing = [], []
    for name in names:
        env = registry.ENVS.get(name)
        (found.append(env.dict(include_invisible=True, max_show_tools=-1)) if env is not None
         else missing.append(name))
    return JSON({"envs_json": found, "missing_envs": missing})


async def retrieving_tools(request):
    data = await _body(request)
    question = _field(data, "question", str)
    top_k = _field(data, "top_k", int, 5)
    if top_k < 0:
        raise NodeError(422, "Field 'top_k' must be >= 0")
    names = registry.retrieve(question, top_k)
    return JSON({"retrieved_tools": names, "tools_json": [registry.TOOLS[n].dict() for n in names]})


async def register_new_tool(request):
    data = await _body(request)
    tool_name = _field(data, "tool_name", str)
    code = _field(data, "code", str)
    from starlette.concurrency import run_in_threadpool

    return JSON(await run_in_threadpool(registry.register, tool_name, code))


def wrap_tool_response(obj):
    """XAgent's result envelope: plain JSON values as they are, everything else typed."""
    if isinstance(obj, tuple):
        if not obj:
            return {"type": "simple", "data": None}
        if len(obj) == 1:
            return {"type": "simple", "data": obj[0]}
        return {"type": "composite", "data": [wrap_tool_response(o) for o in obj]}
    if isinstance(obj, (bytes, bytearray)):
        import base64

        return {"type": "binary", "media_type": "bytes", "name": None,
                "data": base64.b64encode(bytes(obj)).decode()}
    if obj is None or isinstance(obj, (str, int, float, bool, list)):
        return obj
    if isinstance(obj, dict) and obj.get("type") in ("simple", "composite", "binary") and "data" in obj:
        return obj
    return {"type": "simple", "data": obj}


async def _unless_client_leaves(request, work):
    """Run a tool unless the client closes the connection first: then it is cancelled (a shell's
    processes are killed), as nobody will read its result (MCP 2026-07-28: closing cancels)."""
    import asyncio

    task = asyncio.ensure_future(work)

    async def gone():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled() or not task.done():
        try:
            await task
        except asyncio.CancelledError:
            pass
        raise NodeError(499, "the client closed the connection: the tool was cancelled")
    return task.result()


async def execute_tool(request):
    data = await _body(request)
    tool_name = _field(data, "tool_name", str)
    arguments = data.get("arguments", {})
    if isinstance(arguments, str):  # XAgent's client may forward the model's raw JSON string
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            raise NodeError(422, "Field 'arguments' is not valid JSON") from None
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise NodeError(422, "Field 'arguments' must be an object")
    env_name = _field(data, "env_name", str, None, nullable=True)
    tool = registry.lookup(tool_name, env_name)
    try:
        result = await _unless_client_leaves(request, registry.execute(tool, arguments))
        return JSON(wrap_tool_response(result))
    except NodeError as exc:
        if exc.status >= 500:
            log.info("tool %s failed: %s", tool.name, str(exc.detail)[:500])
        raise
    except Exception as exc:
        import traceback

        log.warning("tool %s raised %s: %s", tool.name, type(exc).__name__, exc)
        return _error(500, traceback.format_exc())


async def upload_file(request):
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, parse_options_header

    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or not params.get(b"boundary"):
        raise NodeError(422, "Expected a multipart/form-data body with a 'file' field")
    sink = _UploadSink()
    try:
        parser = MultipartParser(params[b"boundary"], sink.callbacks())
        async for chunk in request.stream():
            if chunk:
                parser.write(chunk)
        parser.finalize()
    except (MultipartParseError, ValueError) as exc:
        sink.abort()
        raise NodeError(422, f"Malformed multipart body: {exc}") from None
    except BaseException:
        sink.abort()
        raise
    if not sink.saved:
        sink.abort()
        if sink.target is None:
            raise NodeError(422, "The multipart field 'file' (with a filename) is required")
        raise NodeError(422, "The multipart body ended before the file did")
    return JSON({"message": "Upload Success!"})


class _UploadSink:
    """Streams the first part named ``file`` straight into the workspace (temp file + rename)."""

    def __init__(self):
        self.headers, self._field, self._value = {}, b"", b""
        self.target = None
        self.tmp = None
        self.fh = None
        self.saved = False

    def callbacks(self):
        return {
            "on_part_begin": self._part_begin, "on_header_field": self._header_field,
            "on_header_value": self._header_value, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self):
        self.headers = {}

    def _header_field(self, data, start, end):
        self._field += data[start:end]

    def _header_value(self, data, start, end):
        self._value += data[start:end]

    def _header_end(self):
        self.headers[self._field.strip().lower()] = self._value.strip()
        self._field, self._value = b"", b""

    def _headers_finished(self):
        from python_multipart.multipart import parse_options_header

        if self.target is not None or self.saved:
            return
        _, opts = parse_options_header(self.headers.get(b"content-disposition", b""))
        if opts.get(b"name") != b"file" or b"filename" not in opts:
            return
        filename = opts[b"filename"].decode("utf-8", errors="replace")
        if not filename.strip():
            raise NodeError(422, "The uploaded file has an empty filename")
        target = paths.resolve(filename, what="Upload filename")
        if target == config.WORKSPACE or os.path.isdir(target):
            raise NodeError(422, f"Upload filename {filename!r} names a directory")
        import tempfile

        directory = os.path.dirname(target)
        os.makedirs(directory, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=".upload-", suffix=".part", dir=directory)
        os.fchmod(fd, 0o644)
        self.fh = os.fdopen(fd, "wb")
        self.target = target

    def _data(self, data, start, end):
        if self.fh is not None:
            self.fh.write(data[start:end])

    def _part_end(self):
        if self.fh is not None:
            self.fh.close()
            self.fh = None
            os.replace(self.tmp, self.target)
            self.tmp = None
            self.saved = True

    def abort(self):
        if self.fh is not None:
            self.fh.close()
            self.fh = None
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except OSError:
                pass
            self.tmp = None


async def download_file(request):
    from starlette.responses import FileResponse

    data = await _body(request)
    file_path = _field(data, "file_path", str)
    file_type = _field(data, "file_type", str, None)
    prefix = os.path.basename(config.WORKSPACE) + "/"
    if file_path.startswith(prefix):
        file_path = file_path[len(prefix):]
    real = paths.resolve(file_path, what="File")
    small = _small_file(real)
    if small is None:
        if not os.path.isfile(real):
            raise NodeError(404, f"File {file_path} not found in workspace.")
        return FileResponse(real, filename=os.path.basename(real), media_type=file_type)
    data, st = small
    # FileResponse's headers (etag, last-modified, disposition, type), with the bytes already read:
    # its four thread hops (stat, open, read, close) cost a small file ten times its read
    head = FileResponse(real, filename=os.path.basename(real), media_type=file_type, stat_result=st)
    answer = Response(data)
    answer.raw_headers = head.raw_headers
    return answer


SMALL_FILE = 65536  # read on the loop: a page-cache read this size takes microseconds


def _small_file(real: str):
    """(bytes, stat) of a regular file of at most SMALL_FILE bytes, else None (missing, large, not a file)."""
    try:
        # O_NONBLOCK: a FIFO put in the file's place after resolve must not block the loop on open
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > SMALL_FILE:
            return None
        data = os.read(fd, SMALL_FILE + 1)
    finally:
        os.close(fd)
    # a file that changed size between fstat and read: the headers would lie, so FileResponse's way
    return (data, st) if len(data) == st.st_size else None


async def download_workspace(request):
    import tempfile

    from starlette.background import BackgroundTask
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import FileResponse

    from .filesystem import zip_workspace

    fd, tmp = tempfile.mkstemp(prefix="workspace-", suffix=".zip")
    os.close(fd)
    try:
        await run_in_threadpool(zip_workspace, tmp)
    except BaseException:
        os.unlink(tmp)
        raise
    return FileResponse(tmp, filename="workspace.zip", media_type="application/zip",
                        background=BackgroundTask(os.unlink, tmp))


async def get_workspace_structure(request):
    from starlette.concurrency import run_in_threadpool

    from .filesystem import workspace_structure

    return JSON(await run_in_threadpool(workspace_structure))


# --- WebSockets -----------------------------------------------------------------------------------
async def ws_shell(websocket):
    from .shell import stream_command

    await stream_command(websocket)


async def ws_echo(websocket):
    """Echo every frame; the text frame ``close:<code>`` closes with that code."""
    await websocket.accept()
    while True:
        msg = await websocket.receive()
        if msg["type"] == "websocket.disconnect":
            return
        text = msg.get("text")
        if text is not None:
            if text.startswith("close:"):
                try:
                    code = int(text[6:])
                except ValueError:
                    code = 0
                valid = code == 1000 or (1001 <= code <= 1014 and code not in (1004, 1005, 1006)) \
                    or 3000 <= code <= 4999
                await websocket.close(code if valid else 1008)
                return
            await websocket.send_text(text)
        elif msg.get("bytes") is not None:
            await websocket.send_bytes(msg["bytes"])


# --- errors and app -------------------------------------------------------------------------------
async def _node_error(request, exc: NodeError):
    return _error(exc.status, exc.detail)


async def _http_error(request, exc: HTTPException):
    return JSON({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def _unexpected(request, exc: Exception):
    import traceback

    log.error("unhandled error on %s: %s", request.url.path, traceback.format_exc())
    return _error(500, f"Internal error: {type(exc).__name__}: {exc}")


@asynccontextmanager
async def lifespan(app):
    paths.ensure_workspace()
    yield
    procs.kill_all()  # shells, the notebook kernel, WebSocket commands: nothing outlives the node


routes = [
    Route("/", root, methods=["GET", "POST"]),
    Route("/upload_file", upload_file, methods=["POST"]),
    Route("/download_file", download_file, methods=["POST"]),
    Route("/download_workspace", download_workspace, methods=["POST"]),
    Route("/get_workspace_structure", get_workspace_structure, methods=["POST"]),
    Route("/get_available_tools", get_available_tools, methods=["POST"]),
    Route("/retrieving_tools", retrieving_tools, methods=["POST"]),
    Route("/get_json_schema_for_tools", get_json_schema_for_tools, methods=["POST"]),
    Route("/get_json_schema_for_envs", get_json_schema_for_envs, methods=["POST"]),
    Route("/register_new_tool", register_new_tool, methods=["POST"]),
    Route("/execute_tool", execute_tool, methods=["POST"]),
    WebSocketRoute("/ws/shell", ws_shell),
    WebSocketRoute("/ws/echo", ws_echo),
]

# /diag sits in front of Starlette (behind the secret): it needs the server's own send
app = RequireSecret(diag.Diag(Starlette(
    routes=routes,
    lifespan=lifespan,
    exception_handlers={NodeError: _node_error, HTTPException: _http_error, Exception: _unexpected},
)), config.SECRET)
