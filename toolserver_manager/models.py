"""Typed results of the client (msgspec Structs); unknown fields from newer servers are ignored."""

from __future__ import annotations

from typing import Any

import msgspec


class Struct(msgspec.Struct, kw_only=True, omit_defaults=False):
    """Base of every result: plain data, convertible with ``msgspec.to_builtins``."""

    def to_dict(self) -> dict[str, Any]:
        """The struct as plain JSON-compatible data."""
        return msgspec.to_builtins(self)  # type: ignore[no-any-return]


# --- session side ------------------------------------------------------------------------------
class CookieInfo(Struct):
    """The answer of ``POST /get_cookie``."""

    node_id: str
    message: str = ""
    version: str = ""
    server: str = ""


class SnapshotInfo(Struct):
    """A named, immutable copy of a session's workspace (``AsyncSession.snapshot``); new sessions
    start from it with ``AsyncSession(snapshot=name)``."""

    name: str
    manager_id: str = ""  # the host that keeps it
    source: str = ""  # the session it was taken of
    client: str = ""
    bytes: int = 0  # what it takes on its host's disk
    created_at: float = 0.0


class ToolResult(Struct):
    """A successful tool call: ``output`` is the node's JSON body exactly as sent."""

    tool_name: str
    output: Any = None
    env_name: str | None = None
    elapsed: float = 0.0

    @property
    def kind(self) -> str | None:
        """``simple``, ``composite`` or ``binary`` for XAgent's typed envelope, else None."""
        out = self.output
        if isinstance(out, dict) and out.get("type") in ("simple", "composite", "binary") and "data" in out:
            return str(out["type"])
        return None

    @property
    def data(self) -> Any:
        """The payload: the envelope's ``data`` when there is one, otherwise the whole output."""
        return self.output["data"] if self.kind is not None else self.output


class ToolParameters(Struct):
    type: str = "object"
    properties: dict[str, Any] = msgspec.field(default_factory=dict)
    required: list[str] = msgspec.field(default_factory=list)


class ToolSpec(Struct):
    """One tool's JSON schema as the node describes it."""

    name: str
    description: str = ""
    parameters: ToolParameters = msgspec.field(default_factory=ToolParameters)


class EnvSpec(Struct):
    name: str
    description: str = ""
    total_tools: int = 0
    tools: list[str] = msgspec.field(default_factory=list)


class AvailableTools(Struct):
    """The answer of ``POST /get_available_tools``."""

    available_envs: list[EnvSpec] = msgspec.field(default_factory=list)
    available_tools: list[str] = msgspec.field(default_factory=list)
    tools_json: list[ToolSpec] = msgspec.field(default_factory=list)


class Download(Struct):
    """A file written by ``download_file``/``download_workspace``."""

    path: str | None  # None when written to a file object
    size: int
    media_type: str = ""
    filename: str = ""


# --- events -------------------------------------------------------------------------------------
class Event(Struct):
    """A node lifecycle event from ``/ws/events`` (``event`` is created, ready, stopped, ...).

    ``event == "gap"`` means the server no longer stores some events after the resume point.
    """

    event: str
    id: str = ""
    node_id: str = ""
    manager_id: str = ""
    at: float = 0.0
    replica_id: str = ""
    detail: str = ""


# --- admin side ---------------------------------------------------------------------------------
class NodeInfo(Struct):
    """One node record as the admin API lists it."""

    id: str
    manager_id: str
    short_id: str = ""
    status: str = ""
    health: str = ""
    host: str = ""
    port: int = 0
    created_at: float = 0.0
    ready_at: float = 0.0
    updated_at: float = 0.0
    last_request_at: float = 0.0
    stopped_at: float = 0.0
    claimed_at: float = 0.0
    replica_id: str = ""
    role: str = ""
    client: str = ""
    image: str = ""
    idle_seconds: float = 0.0
    tier: str = ""  # running, paused, stopped, archived ("" while made or removed)
    container_id: str = ""  # the container serving the session now ("" when archived)
    workspace: str = ""
    paused_at: float = 0.0
    archived_at: float = 0.0


class NodeList(Struct):
    total: int
    offset: int = 0
    limit: int = 0
    nodes: list[NodeInfo] = msgspec.field(default_factory=list)


class NodeDetail(Struct):
    """``GET /admin/nodes/{id}``: the record, the container's state and stats when running."""

    record: NodeInfo
    container: dict[str, Any] | None = None
    stats: dict[str, Any] | None = None
    error: str | None = None


class Replica(Struct):
    replica_id: str
    manager_id: str
    url: str = ""
    version: str = ""
    started_at: float = 0.0
    heartbeat_at: float = 0.0
    draining: bool = False
    age_seconds: float = 0.0


class Lease(Struct):
    """Who holds a manager_id's checker lease."""

    manager_id: str
    holder: str | None = None
    token: int | None = None
    since: float | None = None
    expires_in_ms: int | None = None
    cycles_by_token: dict[str, int] = msgspec.field(default_factory=dict)


class DrainState(Struct):
    manager_id: str
    draining: bool


class Engines(Struct):
    """One engine summary per live manager_id, and the manager_ids that did not answer."""

    results: dict[str, Any] = msgspec.field(default_factory=dict)
    failures: dict[str, str] = msgspec.field(default_factory=dict)
