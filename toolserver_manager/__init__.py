"""Python client of toolserver-manager: one node (sandbox container) per session, tools, files, events, admin."""

from toolserver_manager import client
from toolserver_manager.client import *  # noqa: F403  (the client is the package's public face)
from toolserver_manager.models import (
    AvailableTools,
    CookieInfo,
    Download,
    DrainState,
    Engines,
    EnvSpec,
    Event,
    Lease,
    NodeDetail,
    NodeInfo,
    NodeList,
    Replica,
    SnapshotInfo,
    ToolResult,
    ToolSpec,
)

__all__ = [*client.__all__, "AvailableTools", "CookieInfo", "Download", "DrainState", "Engines", "EnvSpec",
           "Event", "Lease", "NodeDetail", "NodeInfo", "NodeList", "Replica", "SnapshotInfo", "ToolResult",
           "ToolSpec"]
