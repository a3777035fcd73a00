"""shell_command_executor, run_interpreter and the streaming runner behind /ws/shell."""

import asyncio
import json
import os

from . import config, procs
from .errors import NodeError

PIPE = asyncio.subprocess.PIPE


class _Shell:
    def __init__(self, sid: int, proc):
        self.id = sid
        self.proc = proc
        self.out = procs.Capture(proc.stdout)
        self.err = procs.Capture(proc.stderr)

    def display(self) -> str:
        out, err = self.out.text(since_last=True), self.err.text(since_last=True)
        text = ""
        if out:
            text += "\nstdout:\n" + out
        if err:
            text += "\nstderr:\n" + err
        return text

    async def finish(self, grace=0.5):
        await asyncio.gather(self.out.finish(grace), self.err.finish(grace))

    def close(self):
        SHELLS.pop(self.id, None)
        procs.forget(self.proc)


SHELLS: dict = {}


async def _new_shell() -> _Shell:
    for _sid, sh in list(SHELLS.items()):  # drop shells whose bash has exited and been read
        if sh.proc.returncode is not None and sh.out.task.done() and sh.err.task.done():
            sh.close()
    if len(SHELLS) >= config.MAX_SHELLS:
        raise NodeError(500, {"Error": f"Too many shells are open ({len(SHELLS)}); kill some with "
                                       "shell_id=<id>, kill=True."})
    proc = await procs.spawn("bash", stdin=PIPE, stdout=PIPE, stderr=PIPE)
    sh = _Shell(max(SHELLS, default=-1) + 1, proc)  # XAgent's numbering: the first free id after the last
    SHELLS[sh.id] = sh
    return sh


async def _send(sh: _Shell, text: str) -> None:
    if not text:
        return
    if not text.endswith("\n"):
        text += "\n"
    try:
        sh.proc.stdin.write(text.encode())
        await sh.proc.stdin.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass


async def shell_command_executor(command: str = "", run_async: bool = False, shell_id: int = None,
                                 kill: bool = False):
    if shell_id is not None:
        sh = SHELLS.get(shell_id)
        if sh is None:
            raise NodeError(500, {"Error": "Shell not found or has been closed."})
        if sh.proc.returncode is not None:
            await sh.finish(0.2)
            sh.close()
            raise NodeError(500, {"Error": "Shell has been closed.", "ReturnCode": sh.proc.returncode,
                                  "display": sh.display()})
    else:
        sh = await _new_shell()
    try:
        if run_async:
            return await _run_async(sh, command, kill)
        return await _run_to_end(sh, command, kill)
    except asyncio.CancelledError:  # the client went away or the node is stopping
        procs.kill(sh.proc)
        sh.close()
        raise


async def _run_to_end(sh: _Shell, command: str, kill: bool):
    await _send(sh, command)
    try:
        sh.proc.stdin.close()
    except (BrokenPipeError, ConnectionResetError, RuntimeError):
        pass
    try:
        await asyncio.wait_for(sh.proc.wait(), config.SHELL_TIMEOUT)
    except TimeoutError:
        procs.kill(sh.proc)
        await sh.finish(0.2)
        sh.close()
        des = f"Timeout while executing command (limit {config.SHELL_TIMEOUT:g} s). The shell has been killed."
        display = sh.display()
        if display:
            des += " But get some response:" + display
        raise NodeError(500, des) from None
    procs.kill(sh.proc)  # the call is over: what it left running in the background ends with it
    await sh.finish()
    sh.close()
    result = {"ReturnCode": sh.proc.returncode, "display": sh.display()}
    if result["ReturnCode"] != 0 and not kill:
        raise NodeError(500, result)
    return result


async def _run_async(sh: _Shell, command: str, kill: bool):
    await _send(sh, command)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + config.SHELL_ASYNC_WAIT
    seen = len(sh.out.buf) + len(sh.err.buf)
    quiet_since = None
    # wait for output (or the shell's exit), then until output has been quiet for 0.3 s
    while loop.time() < deadline and sh.proc.returncode is None:
        now_seen = len(sh.out.buf) + len(sh.err.buf)
        if now_seen != seen:
            seen, quiet_since = now_seen, loop.time()
        elif quiet_since is not None and loop.time() - quiet_since >= 0.3:
            break
        await asyncio.sleep(0.05)
    result = {"shell_id": sh.id}
    if kill:
        procs.kill(sh.proc)
        await sh.finish(0.2)
        result["display"] = sh.display()
        sh.close()
        result["status"] = "shell thread has been killed"
    elif sh.proc.returncode is not None:
        procs.kill(sh.proc)  # the shell is gone: so is everything it started
        await sh.finish(0.2)
        result["display"] = sh.display()
        result["ReturnCode"] = sh.proc.returncode
        sh.close()
        result["status"] = f"shell exited with return code {sh.proc.returncode}"
    else:
        result["display"] = sh.display()
        result["status"] = "shell still running, no return code"
    return result


async def run_interpreter(code: str = None, command: str = None, filename: str = "code.py"):
    from .paths import resolve

    if code and filename:
        from starlette.concurrency import run_in_threadpool

        from .filesystem import write_to_file

        await run_in_threadpool(write_to_file, filename, code, True)
    if command is None:
        import shlex
        import shutil

        python = "python" if shutil.which("python") else "python3"
        command = f"{python} {shlex.quote(os.path.relpath(resolve(filename), config.WORKSPACE))}"
    sh = await _new_shell()
    await _send(sh, command)
    try:
        sh.proc.stdin.close()
        await asyncio.wait_for(sh.proc.wait(), config.SHELL_TIMEOUT)
    except TimeoutError:
        procs.kill(sh.proc)
        sh.close()
        raise NodeError(500, f"Timeout while executing command (limit {config.SHELL_TIMEOUT:g} s).") from None
    except asyncio.CancelledError:
        procs.kill(sh.proc)
        sh.close()
        raise
    procs.kill(sh.proc)  # the call is over: what it left running in the background ends with it
    await sh.finish()
    sh.close()
    result = {"ReturnCode": sh.proc.returncode}
    err, out = sh.err.text(), sh.out.text()
    if err:
        result["Error"] = err
    if out:
        result["Output"] = out
    return result


# --- /ws/shell --------------------------------------------------------------------------------------
async def stream_command(websocket) -> None:
    """Run the command of the first JSON message and stream its output line by line."""
    from starlette.websockets import WebSocketDisconnect

    await websocket.accept()
    try:
        msg = await websocket.receive()
    except WebSocketDisconnect:
        return
    if msg["type"] == "websocket.disconnect":
        return
    text = msg.get("text")
    if text is None:
        await websocket.send_text(json.dumps({"type": "error", "message": "expected a JSON text frame"}))
        await websocket.close(1003)
        return
    try:
        req = json.loads(text)
        if not isinstance(req, dict):
            raise ValueError("the message must be a JSON object")
        command = req.get("command")
        if not isinstance(command, str) or not command.strip():
            raise ValueError("'command' must be a non-empty string")
        timeout = req.get("timeout", 30)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 86400:
            raise ValueError("'timeout' must be a number of seconds in (0, 86400]")
    except ValueError as exc:
        await websocket.send_text(json.dumps({"type": "error", "message": f"bad request: {exc}"}))
        await websocket.close(1008)
        return

    proc = await procs.spawn("bash", "-c", command, stdin=asyncio.subprocess.DEVNULL, stdout=PIPE,
                             stderr=PIPE)
    send_lock = asyncio.Lock()

    async def send(obj):
        async with send_lock:
            await websocket.send_text(json.dumps(obj))

    async def pump(stream, kind):
        pending = b""
        while True:
            chunk = await stream.read(65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            if len(pending) > 65536:  # flush an overlong partial line as it is
                lines.append(pending)
                pending = b""
            for line in lines:
                await send({"type": kind, "line": line.decode("utf-8", errors="replace").rstrip("\r")})
        if pending:
            await send({"type": kind, "line": pending.decode("utf-8", errors="replace").rstrip("\r")})

    async def watch_client():
        while True:
            m = await websocket.receive()
            if m["type"] == "websocket.disconnect":
                return

    pumps = asyncio.gather(pump(proc.stdout, "stdout"), pump(proc.stderr, "stderr"))
    pumps.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "unretrieved"
    exited = asyncio.ensure_future(proc.wait())
    client = asyncio.ensure_future(watch_client())
    timed_out = False
    try:
        done, _ = await asyncio.wait({exited, client}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if client in done:  # client left: stop the command
            procs.kill(proc)
            pumps.cancel()
            return
        timed_out = exited not in done
        procs.kill(proc)  # exited or timed out: its background children end with the command
        # the rest of the output; a background child still holding the pipes is not waited for
        try:
            await asyncio.wait_for(asyncio.shield(pumps), 1 if timed_out else 0.5)
        except TimeoutError:
            pumps.cancel()
        code = await proc.wait()
        procs.forget(proc)
        exit_msg = {"type": "exit", "code": 124 if timed_out else code}
        if timed_out:
            exit_msg["timed_out"] = True
            await send({"type": "error", "message": f"timeout after {timeout:g} s, command killed"})
        await send(exit_msg)
        await websocket.close(1000)
    except Exception as exc:  # the client vanished mid-stream: stop the command quietly
        import logging

        logging.getLogger("uvicorn.error").debug("/ws/shell ended early: %r", exc)
        procs.kill(proc)
        pumps.cancel()
    finally:
        client.cancel()
        exited.cancel()
