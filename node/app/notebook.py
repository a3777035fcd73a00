"""PythonNotebook: cells run in one kept interpreter (app/kernel.py), started on first use.

Results have the shape of XAgent's node: ``'cell_index: N'`` alone when the cell printed nothing,
otherwise ``{"type": "composite", "data": ["cell_index: N", <output>, ...]}``; a cell that raised
is a tool failure (HTTP 500) whose detail is ``cell_index: N`` followed by the traceback.
"""

import asyncio
import json
import os
import signal
import sys

from . import config, procs
from .errors import NodeError

KERNEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernel.py")

_lock = asyncio.Lock()
_kernel = None
_cells: list = []  # {"source": str, "outputs": [nbformat outputs]}
_count = 0


async def _start():
    global _kernel
    _kernel = await procs.spawn(
        sys.executable, "-P", "-u", KERNEL, str(config.MAX_OUTPUT),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL, limit=32 * config.MAX_OUTPUT + (1 << 20),
    )
    return _kernel


def _stop():
    global _kernel
    if _kernel is not None:
        procs.kill(_kernel)
        _kernel = None


def _err(text: str) -> dict:
    return {"output_type": "error", "ename": "KernelError", "evalue": text, "traceback": [text]}


async def _run(code: str, cell: int) -> list:
    kernel = _kernel if _kernel is not None and _kernel.returncode is None else await _start()
    try:
        kernel.stdin.write(json.dumps({"code": code, "cell": cell}).encode() + b"\n")
        await kernel.stdin.drain()
    except (BrokenPipeError, ConnectionResetError):
        _stop()
        return [_err("The Python kernel died; it will be restarted on the next call.")]
    try:
        line = await asyncio.wait_for(kernel.stdout.readline(), config.NOTEBOOK_TIMEOUT)
    except TimeoutError:
        note = f"Timeout: the cell ran longer than {config.NOTEBOOK_TIMEOUT:g} s"
        try:
            os.kill(kernel.pid, signal.SIGINT)  # like Jupyter's interrupt: the variables survive
            line = await asyncio.wait_for(kernel.stdout.readline(), 2)
        except (TimeoutError, ProcessLookupError):
            line = b""
        if not line:
            _stop()
            return [_err(note + " and did not stop when interrupted: the kernel was restarted and "
                                "all variables are lost.")]
        outputs = json.loads(line)["outputs"]
        outputs.append(_err(note + " and was interrupted."))
        return outputs
    except asyncio.CancelledError:  # client gone or node stopping: the kernel's state is unknown
        _stop()
        raise
    if not line:
        _stop()
        return [_err("The Python kernel died while running the cell (did the code call os._exit or "
                     "run out of memory?); it will be restarted on the next call.")]
    return json.loads(line)["outputs"]


def _format_output(output: dict, reraise: bool = False, cell_index=None):
    kind = output.get("output_type")
    if kind == "stream":
        return output.get("text", "")
    if kind in ("execute_result", "display_data"):
        data = output.get("data", {})
        return data.get("text/plain", data)
    if kind == "error":
        text = "\n".join(output.get("traceback") or [output.get("evalue", "")])
        if reraise:
            raise NodeError(500, f"cell_index: {cell_index}\n{text}")
        return text
    return output


def _format_outputs(outputs: list, cell_index=None, reraise=False):
    if not outputs:
        return "" if cell_index is None else f"cell_index: {cell_index}"
    errors = [o for o in outputs if o.get("output_type") == "error"]
    if reraise and errors:  # a failing cell is a failing tool call (HTTP 500), as in XAgent's node
        text = "\n".join(_format_output(o, False) for o in errors)
        raise NodeError(500, f"cell_index: {cell_index}\n{text}")
    formatted = [_format_output(o, False) for o in outputs]
    if cell_index is None:
        return formatted[0] if len(formatted) == 1 else {"type": "composite", "data": formatted}
    return {"type": "composite", "data": [f"cell_index: {cell_index}", *formatted]}


def _save() -> None:
    """Keep the notebook as python_notebook.ipynb in the workspace (best effort, like XAgent)."""
    nb = {
        "cells": [{"cell_type": "code", "execution_count": c.get("count"), "metadata": {},
                   "outputs": c["outputs"], "source": c["source"]} for c in _cells],
        "metadata": {"kernelspec": {"name": "python", "language": "python", "display_name": "python"}},
        "nbformat": 4, "nbformat_minor": 4,
    }
    path = os.path.join(config.WORKSPACE, config.NOTEBOOK_FILE)
    try:
        if os.path.islink(path):
            return
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(nb, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        pass


async def execute_cell(code: str, cell_index: int = None, reset: bool = False):
    global _count
    async with _lock:
        if reset:
            _stop()
        n = len(_cells)
        if cell_index is None or cell_index == n or n == 0:
            _cells.append({"source": code, "outputs": []})
            index = n
        elif -n <= cell_index < n:
            index = cell_index % n
            _cells[index] = {"source": code, "outputs": []}
        else:
            raise NodeError(500, f"cell_index {cell_index} is out of range: the notebook has {n} cells.")
        outputs = await _run(code, index)
        _count += 1
        _cells[index]["outputs"] = outputs
        _cells[index]["count"] = _count
        _save()
        return _format_outputs(outputs, index, reraise=True)


def print_notebook() -> str:
    text = ""
    for i, cell in enumerate(_cells):
        text += f"= Cell {i} =\n{cell['source']}\n"
        if cell["outputs"]:
            shown = _format_outputs(cell["outputs"])
            if isinstance(shown, dict):
                shown = "\n".join(str(x) for x in shown["data"])
            text += f"= Output {i} =\n{shown}\n"
    return text
