"""The error hierarchy; manager/edge/errors_http.py maps it to HTTP responses in one place.

    ManagerError (500)
    ├── ConfigError             invalid configuration, raised at start
    ├── BadRequest (400)
    ├── Unauthorized (401)
    ├── Forbidden (403)
    │   └── InvalidNode         no or unknown node_id cookie on a proxied path
    ├── NotFound (404)
    │   └── NodeNotFound        unknown node on a session or admin route
    ├── ContainerGone (404)     the engine has no such container: callers treat it as an unknown node
    ├── QuotaExceeded (429)
    ├── TooManyFailures (429)   too many wrong admin tokens from one address (Retry-After)
    ├── NodeReadTimeout (504)   a proxied request got no answer in time: a tool error, not an outage
    ├── EngineError (502)       the engine refused an operation (other than 404)
    ├── ForkIncomplete (502)    some copies of a fork could not be made (the answer names those that exist)
    ├── UpstreamLost (502)      the connection to a node's host was lost mid-request
    ├── NodeResponseTooLarge (502) a node's answer went past a bound (head, headers, a body read whole)
    └── Unavailable (503)
        ├── RedisUnavailable
        ├── EngineUnavailable
        ├── NodeTimeout         a node did not become ready in time
        │   └── SessionBusy     another caller held the session's lock longer than one may wait
        ├── NodeNotRunning
        ├── NodeNotResponding
        ├── AddressUnconfirmed  the engine does not confirm a node's recorded address (no secret sent)
        ├── WorkspaceUnavailable a session's workspace cannot be mounted (the session is kept)
        ├── NoLiveManager       no live replica of the owning manager_id
        │   └── HostUnreachable the host of a node (or of the owner's replicas) does not answer
        ├── CapacityExhausted   no host has room for another node
        ├── CreationQueueFull   too many creations waiting on the engine (Retry-After)
        └── ImageMissing        the engine has no node image (not pulled or loaded yet)
"""

from __future__ import annotations


class ManagerError(Exception):
    status_code = 500

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class ConfigError(ManagerError):
    pass


class BadRequest(ManagerError):
    status_code = 400


class Unauthorized(ManagerError):
    status_code = 401


class Forbidden(ManagerError):
    status_code = 403


class InvalidNode(Forbidden):
    def __init__(self, node_id: str | None) -> None:
        super().__init__(f"invalid node_id: {node_id}")
        self.node_id = node_id


class NotFound(ManagerError):
    status_code = 404


class NodeNotFound(NotFound):
    def __init__(self, node_id: str | None) -> None:
        super().__init__(f"invalid node_id: {node_id}")
        self.node_id = node_id


class QuotaExceeded(ManagerError):
    status_code = 429


class TooManyFailures(ManagerError):
    status_code = 429

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = max(1, retry_after)


class NodeReadTimeout(ManagerError):
    status_code = 504

    def __init__(self, seconds: float | None) -> None:
        super().__init__(f"the node did not answer within {seconds} s")


class Unavailable(ManagerError):
    status_code = 503


class RedisUnavailable(Unavailable):
    def __init__(self, why: str = "") -> None:
        super().__init__(f"redis is unavailable{': ' + why if why else ''}")


class EngineUnavailable(Unavailable):
    def __init__(self, why: str = "") -> None:
        super().__init__(f"docker engine is unavailable{': ' + why if why else ''}")


class ContainerGone(ManagerError):
    """The engine has no such container (404 from Docker); callers treat it as an unknown node.

    Only for containers (and their volumes): a missing image is ImageMissing, never a session gone."""

    status_code = 404


class EngineError(ManagerError):
    """The engine refused an operation (4xx/5xx other than 404)."""

    status_code = 502


class NodeTimeout(Unavailable):
    pass


class SessionBusy(NodeTimeout):
    def __init__(self) -> None:
        # what a client waiting on a restart has always been told
        super().__init__("Node restart timeout!")


class NodeNotRunning(Unavailable):
    def __init__(self, node_id: str) -> None:
        super().__init__(f"node is not running: {node_id}")


class NodeNotResponding(Unavailable):
    def __init__(self) -> None:
        super().__init__("node is not responding")


class AddressUnconfirmed(Unavailable):
    """The engine does not confirm a node's recorded address: its secret is not sent there."""

    def __init__(self, node_id: str, why: str) -> None:
        super().__init__(f"the engine does not confirm the address of node {node_id}: {why}")


class WorkspaceUnavailable(Unavailable):
    def __init__(self, session_id: str, why: str) -> None:
        super().__init__(f"the workspace of session {session_id} cannot be mounted: {why}")


class NoLiveManager(Unavailable):
    def __init__(self, manager_id: str) -> None:
        super().__init__(f"no live manager for {manager_id}")
        self.manager_id = manager_id


class HostUnreachable(NoLiveManager):
    """The host does not answer connections: a circuit is open for it (see nodeops/circuit.py)."""

    def __init__(self, host: str, manager_id: str, why: str = "") -> None:
        super().__init__(manager_id)
        self.detail = f"host {host} is unreachable (nodes of {manager_id}){': ' + why if why else ''}"
        self.args = (self.detail,)
        self.host = host


class ForkIncomplete(ManagerError):
    """A fork made fewer copies than asked: the answer carries the ids of those that exist."""

    status_code = 502

    def __init__(self, detail: str, sessions: list[str]) -> None:
        super().__init__(detail)
        self.extra = {"sessions": sessions}


class UpstreamLost(ManagerError):
    """A request was in flight when its node's host stopped answering."""

    status_code = 502


class NodeResponseTooLarge(ManagerError):
    """A node's answer went past one of the proxy's bounds; its connection was dropped."""

    status_code = 502


class CapacityExhausted(Unavailable):
    pass


class CreationQueueFull(Unavailable):
    """The engine's creation queue is full (nodeops/admission.py): the client retries later."""

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = max(1, retry_after)


class ImageMissing(Unavailable):
    """No node image on the engine: nothing can be created until it is pulled or loaded."""

    def __init__(self, image: str, why: str = "") -> None:
        super().__init__(f"node image {image} is not on the engine{f' ({why})' if why else ''}")
        self.image = image
