"""Settings, all read once from the environment (no config file: the root filesystem is read-only)."""

import os


def _float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def _int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


HOST = os.environ.get("NODE_HOST", "0.0.0.0")
PORT = _int("NODE_PORT", 31942)
# The only directory (besides /tmp) the node writes to.
WORKSPACE = os.path.realpath(os.environ.get("NODE_WORKSPACE", "/app/workspace"))
# Timeouts of the shell tool and of one notebook cell, in seconds (XAgent's node.yml uses 300 for both).
SHELL_TIMEOUT = _float("NODE_SHELL_TIMEOUT", 300.0)
NOTEBOOK_TIMEOUT = _float("NODE_NOTEBOOK_TIMEOUT", 300.0)
# How long an asynchronous shell call waits for first output before returning.
SHELL_ASYNC_WAIT = _float("NODE_SHELL_ASYNC_WAIT", 5.0)
# Cap on captured output per stream of one tool call (bytes); the rest is dropped and marked.
MAX_OUTPUT = _int("NODE_MAX_OUTPUT", 1 << 20)
# Cap on concurrently kept shells (run_async / shell_id).
MAX_SHELLS = _int("NODE_MAX_SHELLS", 32)
# How long uvicorn waits for running requests on SIGTERM before cancelling them.
GRACEFUL_SHUTDOWN = _int("NODE_GRACEFUL_SHUTDOWN", 1)
LOG_LEVEL = os.environ.get("NODE_LOG_LEVEL", "info").upper()
# The per-node secret every request must carry (app.auth); empty: every request is refused.
SECRET = os.environ.get("NODE_SECRET", "")
# Optional Bing key for WebEnv_search_and_browse (DuckDuckGo's HTML page is used without one).
BING_API_KEY = os.environ.get("NODE_BING_API_KEY") or None
BING_ENDPOINT = os.environ.get("NODE_BING_ENDPOINT", "https://api.bing.microsoft.com/v7.0/search")
WEB_TIMEOUT = _float("NODE_WEB_TIMEOUT", 30.0)
USER_AGENT = os.environ.get(
    "NODE_USER_AGENT",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36",
)
# Name of the notebook file PythonNotebook keeps in the workspace (as XAgent's node does).
NOTEBOOK_FILE = "python_notebook.ipynb"
# Patterns hidden from FileSystemEnv_print_filesys_struture (XAgent's defaults).
IGNORED = (
    "*/.git/*", NOTEBOOK_FILE, "*/node_modules/*", "*/venv/*", "*/__pycache__/*",
    "*/.ipynb_checkpoints/*", "*/.vscode/*", "*/.idea/*", "*/.vs/*", "*/python*/site-packages/*",
)
MAX_ENTRIES_PER_LEVEL = 20
