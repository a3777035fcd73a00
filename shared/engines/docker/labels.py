"""Docker's words for our nodes: labels, object names, container states, sizes and addresses.

Everything here is plain data and parsing; nothing calls the engine.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from shared.models import NodeStatus

LABEL_PREFIX = "toolserver-manager."
LABEL_MANAGER = LABEL_PREFIX + "manager_id"
LABEL_ROLE = LABEL_PREFIX + "role"
LABEL_CREATED = LABEL_PREFIX + "created_at"
LABEL_REPLICA = LABEL_PREFIX + "replica_id"
LABEL_CLIENT = LABEL_PREFIX + "client"
LABEL_PORT = LABEL_PREFIX + "node_port"
LABEL_PROJECT = LABEL_PREFIX + "project"
LABEL_EGRESS = LABEL_PREFIX + "egress"
LABEL_IMAGE_FILE = LABEL_PREFIX + "image_file"
LABEL_SESSION = LABEL_PREFIX + "session_id"
LABEL_WORKSPACE = LABEL_PREFIX + "workspace"
NETWORK_PREFIX = "tsm-"  # node networks: tsm-<manager_id>-<egress>
WORKSPACE_PREFIX = "tsm-ws-"  # bounded workspaces of containers made before sessions had their own
SESSION_WORKSPACE_PREFIX = "tsm-session-"  # a session's workspace: tsm-session-<session id>
SEED_DIR = "seeds"  # saved workspace images (forks in flight, snapshots): <image_dir>/seeds/<seed>.img
SEED_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,127}")
SECRET_ENV = "NODE_SECRET"  # how the reference node (node/app/auth.py) receives its secret
# Docker's container states are ours by the same names; one the engine adds later passes as is
_STATES = {s.value: s for s in (NodeStatus.CREATED, NodeStatus.RUNNING, NodeStatus.PAUSED, NodeStatus.RESTARTING,
                                NodeStatus.REMOVING, NodeStatus.EXITED, NodeStatus.DEAD)}

# run()-only or handled-by-us keys of XAgent's creation_kwargs
DROP_KWARGS = {"detach", "remove", "stream", "ports", "labels", "name", "auto_remove"}
# replaced by the node network when nodes are isolated
NETWORK_KWARGS = {"network", "network_mode", "networking_config", "links", "dns"}


def parse_time(value: str) -> float:
    """Docker's RFC 3339 time with nanoseconds, as a Unix timestamp (0 when absent)."""
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?", value or "")
    if not m or value.startswith("0001-"):
        return 0.0
    base = datetime.fromisoformat(m.group(1) + "+00:00").timestamp()
    return base + float("0." + (m.group(2) or "0"))


def state(value: str) -> str:
    return _STATES.get(value, value)


def owner_filter(owner: str, role: str | None = None) -> list[str]:
    return [f"{LABEL_MANAGER}={owner}"] + ([f"{LABEL_ROLE}={role}"] if role else [])


def node_ip(settings: dict[str, Any]) -> str:
    """The container's address on its node network ("" when it has none: not running)."""
    for name, net in (settings.get("Networks") or {}).items():
        if name.startswith(NETWORK_PREFIX) and net.get("IPAddress"):
            return str(net["IPAddress"])
    return ""


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(value: object) -> int:
    """Docker's memory sizes ("512m", "1g", 1073741824) in bytes; 0 when absent or unparsable."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+)\s*([bkmgt]?)b?\s*", str(value or "").lower())
    return int(m.group(1)) * _UNITS[m.group(2)] if m else 0

