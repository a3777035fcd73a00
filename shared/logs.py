"""Structured logs: one line per event, logfmt or JSON, with the replica's identity.

Call sites log ``"event_name key=value key=value"``; the formatter adds time, level,
replica_id and manager_id, and in JSON mode splits the pairs into fields.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

# a secret in a URL (uvicorn logs WebSocket paths with their query) never reaches a log line
_SECRET_IN_URL = re.compile(r"(?i)([?&](?:token|access_token|api_key|tsm_api_key|tsm_console)=)[^&\s\"']*")
# a session id is a bearer credential (the node_id cookie): logs show its first 12 characters, as
# Docker shows ids, enough to find it with the admin API (digests after "sha256:" are left alone)
_SESSION_ID = re.compile(r"(?<![0-9a-f:])([0-9a-f]{12})[0-9a-f]{52}(?![0-9a-f])")


def redact(text: str) -> str:
    """The text without credentials: URL secrets replaced, session ids cut to 12 characters."""
    return _SESSION_ID.sub(r"\1...", _SECRET_IN_URL.sub(r"\1[redacted]", text))


class _Formatter(logging.Formatter):
    def __init__(self, fmt: str, replica_id: str, manager_id: str) -> None:
        super().__init__()
        self.json = fmt == "json"
        self.ident = {"replica_id": replica_id, "manager_id": manager_id}

    def format(self, record: logging.LogRecord) -> str:
        msg = redact(record.getMessage())
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        if self.json:
            event, _, rest = msg.partition(" ")
            out: dict[str, object] = {"ts": ts, "level": record.levelname.lower(), "logger": record.name,
                                      "event": event}
            for pair in rest.split(" "):
                k, sep, v = pair.partition("=")
                if sep:
                    out[k] = v
                elif pair:
                    out.setdefault("text", "")
                    out["text"] = f"{out['text']} {pair}".strip()
            for k, v in self.ident.items():
                out.setdefault(k, v)
            if record.exc_info:
                out["exc"] = redact(self.formatException(record.exc_info))
            return json.dumps(out)
        line = f"ts={ts} level={record.levelname.lower()} logger={record.name} replica_id={self.ident['replica_id']} {msg}"
        if record.exc_info:
            line += "\n" + redact(self.formatException(record.exc_info))
        return line


def setup_logging(level: int | str, fmt: str, replica_id: str, manager_id: str) -> None:
    """Route every logger (ours and uvicorn's) through one structured handler on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(fmt, replica_id, manager_id))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if isinstance(level, int) else level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # never a line per proxied request
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
