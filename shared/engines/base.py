"""The NodeBackend interface: what node operations ask of a container engine, in our terms.

Owner (manager_id), role, a status from NodeStatus, an address to reach the node at:
nothing here names a label, a filter or an engine's state word. Each engine implements
this class in a module of its own beside this one, found by its kind (shared/engines/__init__.py). The shape follows JupyterHub's
Proxy (a few abstract coroutines) and dockerspawner's create_object/remove_object.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Iterator
from typing import Any, NamedTuple

import msgspec

from shared.errors import BadRequest
from shared.models import NodeStatus, Role

__all__ = ["Address", "Changes", "EngineInfo", "NewNode", "NodeBackend", "NodeInfo", "NodeStatus", "Role", "WorkspaceInfo"]


class Changes(abc.ABC):
    """A feed of one owner's node changes (NodeBackend.changes), iterated once, in a thread of its own:
    it blocks until a node changes and yields its id, or None when anything may have changed unseen
    (the feed began, or began again after a break: a full look is due); close() from any other thread
    ends the iteration promptly."""

    @abc.abstractmethod
    def __iter__(self) -> Iterator[str | None]: ...

    @abc.abstractmethod
    def close(self) -> None:
        """Stop following: the iteration ends now, not at the next change."""


class Address(NamedTuple):
    """Where a node's HTTP port is reached from the replicas."""

    host: str
    port: int


class NewNode(msgspec.Struct, kw_only=True):
    """What a node is created with, besides the engine's own settings from the config."""

    owner: str  # manager_id
    role: str
    replica_id: str  # the replica that creates it
    created_at: float
    client: str = ""
    secret: str = ""  # the node requires it on every request; kept by the engine, never in a label
    session_id: str = ""  # the session it serves; the container is named after it
    workspace: str = ""  # the session's workspace (from create_workspace) to mount; "": none of its own
    seed: str = ""  # a saved workspace (capture_workspace) the new workspace starts as a copy of; "": empty


class EngineInfo(msgspec.Struct, kw_only=True):
    """Facts about an engine for cluster-wide reads (0 or "" where the engine does not say)."""

    name: str = ""  # the engine's host name
    version: str = ""
    nodes: int = 0  # containers on the engine, of any owner
    running: int = 0
    stopped: int = 0
    cpus: int = 0
    memory_bytes: int = 0
    meta: dict[str, Any] = msgspec.field(default_factory=dict)  # in the engine's own words, shown to admins as is


class NodeInfo(msgspec.Struct, kw_only=True):
    """What the engine says about one of our nodes."""

    id: str
    owner: str
    role: str
    status: str  # a NodeStatus; a state the engine names that we do not know passes as it is
    health: str  # healthy, unhealthy, starting, or "none" when the image has no health check
    created: float
    host: str = ""  # where the node is reached (with port)
    port: int = 0  # 0 when not reachable (not running)
    replica_id: str = ""
    client: str = ""
    image: str = ""
    meta: dict[str, str] = msgspec.field(default_factory=dict)  # engine metadata, shown to admins as is
    session_id: str = ""  # the session it serves ("" for containers made before sessions had ids)
    workspace: str = ""  # the session workspace it mounts
    ip: str = ""  # its address on the node network while it runs (what egress rules match)

    @property
    def address(self) -> Address:
        return Address(self.host, self.port)

    @property
    def session(self) -> str:
        """The session this container serves: its own id for containers older than session ids."""
        return self.session_id or self.id


class WorkspaceInfo(msgspec.Struct, kw_only=True):
    """A session's workspace as the engine describes it."""

    name: str
    session_id: str
    owner: str
    role: str
    replica_id: str
    created: float
    client: str = ""


class NodeBackend(abc.ABC):
    """One container engine, driven asynchronously."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise EngineUnavailable unless the engine answers."""

    @abc.abstractmethod
    async def create(self, node: NewNode) -> str:
        """Create (not start) a node; return its id."""

    @abc.abstractmethod
    async def start(self, node_id: str) -> Address:
        """Start a node; return where it is reached."""

    @abc.abstractmethod
    async def restart(self, node_id: str, timeout: int = 5) -> Address:
        """Restart (or start) a node; return where it is reached."""

    @abc.abstractmethod
    async def stop(self, node_id: str, timeout: int = 5) -> None:
        """Stop a node, keeping it for a later restart."""

    @abc.abstractmethod
    async def remove(self, node_id: str) -> bool:
        """Kill and remove a node; False when it was already gone."""

    @abc.abstractmethod
    async def inspect(self, node_id: str) -> NodeInfo:
        """One node; ContainerGone when the engine has no such node."""

    @abc.abstractmethod
    async def node_secret(self, node_id: str) -> str:
        """The secret a node was created with ("" when none), to rebuild a lost record."""

    @abc.abstractmethod
    async def nodes(self, owner: str, role: str | None = None) -> list[NodeInfo]:
        """Every node of owner (any status), optionally of one role: one engine call."""

    @abc.abstractmethod
    async def stats(self, node_id: str) -> dict[str, Any]:
        """Memory, CPU and process counts of a running node."""

    @abc.abstractmethod
    async def logs(self, node_id: str, tail: int, follow: bool) -> AsyncIterator[bytes]:
        """A node's output (stdout and stderr) as the engine kept it, opened: the last tail lines,
        then, with follow, what it prints until it stops or the caller closes the iterator;
        ContainerGone when the engine has no such node."""

    @abc.abstractmethod
    async def info(self) -> EngineInfo:
        """Facts about the engine for cluster-wide reads."""

    @abc.abstractmethod
    def changes(self, owner: str) -> Changes:
        """A feed of owner's node changes (Changes: iterate it in a thread, close it to stop)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the engine's clients and threads."""

    @property
    def image(self) -> str:
        """The image nodes are created from ("" when the engine has no such notion)."""
        return ""

    @property
    def node_memory_bytes(self) -> int:
        """The memory one node may use at most (0: no limit, or the engine cannot say)."""
        return 0

    @property
    def max_nodes(self) -> int:
        """The live nodes of one owner the engine can hold at once, whatever memory says (0: no bound)."""
        return 0

    async def image_present(self) -> bool:
        """Whether the engine has the node image."""
        return True

    async def pull_image(self) -> None:  # noqa: B027  (a no-op default: engines without a registry keep it)
        """Fetch the node image from its registry; EngineError when it cannot."""

    async def prepare(self, owner: str) -> dict[str, str]:
        """Check the settings and make what owner's nodes need before the first one (their
        network, host rules); what protects them, by name. Bad settings raise ConfigError."""
        return {}

    async def egress_bridge(self, owner: str) -> tuple[str, str, int] | None:
        """(host interface, its IPv4 address, prefix length) of owner's node network, where the
        egress resolver listens and the egress rules match; None: this engine has none."""
        return None

    async def engine_netns(self, owner: str) -> int | None:
        """A pid in the network namespace of owner's node network when it is not the manager's own
        (the egress agent makes its sockets and runs nft there); None: the manager's."""
        return None

    async def collect_storage(self, owner: str, older_than: float) -> int:
        """Remove storage of owner's nodes that no longer exist, made before older_than; how many."""
        return 0

    async def foreground(self, node_id: str) -> None:  # noqa: B027  (engines without CPU weights keep it)
        """A node made in the background (a pooled node boots at a low CPU weight, so filling the
        pool never slows clients' own work) gets its configured weight back before it is offered."""

    # --- session tiers and workspaces -----------------------------------------------
    @abc.abstractmethod
    async def pause(self, node_id: str) -> None:
        """Freeze a running node: memory kept, no CPU."""

    @abc.abstractmethod
    async def unpause(self, node_id: str) -> None:
        """Thaw a paused node."""

    @abc.abstractmethod
    def workspace_name(self, session_id: str) -> str:
        """The name create_workspace gives a session's workspace."""

    @abc.abstractmethod
    async def create_workspace(self, node: NewNode) -> str:
        """Make the workspace of node.session_id (labelled like its nodes, outliving them); its name."""

    @abc.abstractmethod
    async def ready_workspace(self, name: str) -> None:
        """Make an existing workspace mountable again (its storage attached); WorkspaceUnavailable
        when it cannot be, ContainerGone when the engine has no such workspace."""

    @abc.abstractmethod
    async def remove_workspace(self, name: str) -> None:
        """Remove a session's workspace and whatever holds it; nothing left is fine."""

    @abc.abstractmethod
    async def workspaces(self, owner: str) -> list[WorkspaceInfo]:
        """Every session workspace of owner: one engine call."""

    # --- forks and snapshots: saved copies of a workspace ("seeds") -----------------
    async def capture_workspace(self, name: str, seed: str) -> float:
        """Save workspace name, as it is at one instant, as the seed named seed (held still only
        for the copy; its node keeps answering reads); the seconds its writes were held.
        BadRequest when this engine's workspaces cannot be copied."""
        raise BadRequest("this engine cannot copy workspaces")

    async def drop_seed(self, seed: str) -> None:  # noqa: B027  (nothing saved: nothing to drop)
        """Delete a seed; nothing left is fine."""

    async def adopt_workspace(self, name: str, seed: str) -> None:
        """Make the running node of workspace name (a pooled node's) hold a copy of seed in place of
        its files; BadRequest when this engine or workspace cannot, ContainerGone when no node runs."""
        raise BadRequest("this engine cannot hand a copy to a running node")

    async def export_seed(self, seed: str) -> AsyncIterator[bytes]:
        """A seed's bytes as a stream import_seed reads (ContainerGone when there is no such seed)."""
        raise BadRequest("this engine cannot copy workspaces")

    async def import_seed(self, seed: str, chunks: AsyncIterator[bytes]) -> None:
        """Make the seed seed from what export_seed streamed (on another host)."""
        raise BadRequest("this engine cannot copy workspaces")

    async def drop_stale_seeds(self, prefix: str, older_than: float, keep: set[str]) -> int:
        """Drop this host's seeds named prefix..., made before older_than, but those in keep
        (what half-made copies left too); how many."""
        return 0

    async def seed_bytes(self, seed: str) -> int:
        """Bytes a seed takes on this host's disk (0 when there is no such seed)."""
        return 0
