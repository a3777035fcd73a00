"""PythonNotebook's kernel: one persistent interpreter, driven by app.notebook over stdin/stdout.

Run as a plain script (``python3 -P -u kernel.py <max_output_bytes>``), not as part of the package,
so user code sees a clean ``__main__``. Protocol: one JSON request per line on stdin
(``{"code": ..., "cell": n}``), one JSON reply per line on stdout (``{"outputs": [...]}``, nbformat
output dicts). While a cell runs, file descriptors 1 and 2 point at temporary files, so output of
child processes is captured too; the protocol uses private duplicates of the original descriptors.
"""

import ast
import builtins
import json
import linecache
import os
import signal
import sys
import tempfile
import traceback

MAX_OUTPUT = int(sys.argv[1]) if len(sys.argv) > 1 else 1 << 20
KERNEL_FILE = os.path.abspath(__file__)


def _read_capture(f) -> str:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(0)
    data = f.read(MAX_OUTPUT)
    text = data.decode("utf-8", errors="replace")
    if size > MAX_OUTPUT:
        text += f"\n[... {size - MAX_OUTPUT} more bytes of output dropped]"
    return text


def _format_error(exc: BaseException) -> dict:
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == KERNEL_FILE:
        tb = tb.tb_next  # hide the kernel's own frames
    if isinstance(exc, SyntaxError) and tb is not None and not tb.tb_frame.f_code.co_filename.startswith("<cell-"):
        tb = None  # raised by ast.parse/compile: only the message and the caret matter
    lines = traceback.format_exception(type(exc), exc, tb)
    return {"output_type": "error", "ename": type(exc).__name__, "evalue": str(exc),
            "traceback": [line.rstrip("\n") for line in lines]}


def run_cell(code: str, cell: int, count: int, namespace: dict, null_fd: int) -> list:
    outputs = []
    filename = f"<cell-{cell}>"
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    with tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(out_f.fileno(), 1)
        os.dup2(err_f.fileno(), 2)
        result = error = None
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the node interrupts on timeout
        try:
            tree = ast.parse(code, filename)
            last = None
            if tree.body and isinstance(tree.body[-1], ast.Expr):
                last = ast.Expression(tree.body.pop().value)
            exec(compile(tree, filename, "exec"), namespace)
            if last is not None:
                value = eval(compile(last, filename, "eval"), namespace)
                if value is not None:
                    namespace["_"] = value
                    result = repr(value)
        except BaseException as exc:  # SystemExit and KeyboardInterrupt too: the kernel lives on
            error = _format_error(exc)
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
            os.dup2(null_fd, 1)
            os.dup2(null_fd, 2)
        out, err = _read_capture(out_f), _read_capture(err_f)
    if out:
        outputs.append({"output_type": "stream", "name": "stdout", "text": out})
    if err:
        outputs.append({"output_type": "stream", "name": "stderr", "text": err})
    if result is not None:
        if len(result) > MAX_OUTPUT:
            result = result[:MAX_OUTPUT] + f"\n[... {len(result) - MAX_OUTPUT} more characters dropped]"
        outputs.append({"output_type": "execute_result", "execution_count": count,
                        "data": {"text/plain": result}, "metadata": {}})
    if error is not None:
        outputs.append(error)
    return outputs


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    requests = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "wb")
    null_fd = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null_fd, fd)
    sys.path.insert(0, "")  # like Jupyter: modules in the working directory (the workspace) import
    namespace = {"__name__": "__main__", "__builtins__": builtins, "__doc__": None}
    count = 0
    for line in requests:
        try:
            req = json.loads(line)
            count += 1
            outputs = run_cell(req["code"], int(req.get("cell", 0)), count, namespace, null_fd)
        except Exception as exc:  # a broken request: report it, keep serving
            outputs = [_format_error(exc)]
        replies.write(json.dumps({"outputs": outputs}, ensure_ascii=False).encode("utf-8", "replace") + b"\n")
        replies.flush()


if __name__ == "__main__":
    main()
