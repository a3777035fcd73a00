"""The one typed configuration: YAML file, then environment variables on top.

Environment overrides: ``TSM_<KEY>`` with ``__`` between nested keys
(``TSM_NODE__IDLING_CLOSE_MINUTES=5``), and XAgent's top-level names as they are
(``builtin_monitor=false``). Values are parsed as YAML scalars, so ``false`` is False.
"""

from __future__ import annotations

import copy
import ipaddress
import logging
import os
import socket
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import msgspec
import yaml

from shared import __version__
from shared.egress import policy as egress_policy
from shared.egress.policy import EgressPolicy
from shared.errors import ConfigError, ManagerError

log = logging.getLogger(__name__)

XAGENT_POST_PATHS = [
    "/",
    "/execute_tool",
    "/get_available_tools",
    "/get_json_schema_for_tools",
    "/get_json_schema_for_envs",
    "/retrieving_tools",
    "/register_new_tool",
    "/upload_file",
    "/download_file",
    "/download_workspace",
    "/get_workspace_structure",
]


class Base(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Shared settings: a typo in a key fails at start instead of being ignored."""


def _default_creation_kwargs() -> dict[str, Any]:
    # Hardened defaults (XAgent ran nodes privileged); every key is overridable.
    return {
        "image": "toolserver-node:latest",
        "init": True,
        "mem_limit": "1g",
        "nano_cpus": 1_000_000_000,
        "pids_limit": 512,
        "cap_drop": ["ALL"],
        "cap_add": ["CHOWN", "DAC_OVERRIDE", "FOWNER", "SETGID", "SETUID", "KILL"],
        "security_opt": ["no-new-privileges"],
    }


# an isolated node network is one Linux bridge per manager_id, and a bridge has 1024 ports numbered
# from 1 (BR_MAX_PORTS): a node that runs or is paused holds one, so the 1024th fails to start with
# the kernel's "exchange full". The node cap never goes past it (the Docker engine's max_nodes)
BRIDGE_MAX_NODES = 1023
EGRESS_MODES = ("open", "none")
IMAGE_PULL_POLICIES = ("missing", "never")
PLACEMENTS = ("spread", "local")


class NetworkConfig(Base):
    """Where nodes live on the network (see the README's isolation section)."""

    # a bridge per manager_id with traffic between nodes off; nodes join it and nothing else.
    # false: the engine's default bridge, as before this setting existed (no isolation)
    isolated: bool = True
    egress: str = "open"  # open: the outside only (no private, link-local or host address); none: nothing
    # publish the node port on node.publish_host: only where another host must reach nodes
    # (DaemonSet mode); a published port still wants the node's secret
    publish: bool = False
    allow_cidrs: list[str] = msgspec.field(default_factory=list)  # private destinations nodes may reach
    # install the host firewall chains (TSM-INPUT, TSM-FORWARD) at start; without the privilege to,
    # the manager says so once and /ready reports it
    firewall: bool = True
    # run iptables in the namespaces of the engine (the dockerd process that has the node bridge,
    # else PID 1) with nsenter: for a manager in a container that shares the host's PID namespace
    # (the chart's pods on the host's engine), so the rules land where the node bridges are
    firewall_host_namespace: bool = False


class DiskConfig(Base):
    """What a node may write (see the README's isolation section)."""

    workspace_bytes: int = 1 << 30  # the workspace: a file system of its own of this size; 0: unbounded
    tmp_bytes: int = 256 << 20  # /tmp (memory-backed, counts against the memory limit)
    read_only_root: bool = True  # everything else is read-only
    log_bytes: int = 20 << 20  # the container's log, in two rotated files; 0: the engine's default
    image_dir: str = "/var/lib/toolserver-manager/workspaces"  # where workspace images are kept


class TiersConfig(Base):
    """How long a session may sit idle (no request in flight, no open WebSocket) before it goes to
    a cheaper tier; null turns a tier off. Stopping in between is node.idling_close_minutes."""

    pause_after_seconds: float | None = 300.0  # docker pause: memory kept, no CPU, resumed in ms
    archive_after_seconds: float | None = 86400.0  # container removed, workspace kept
    delete_after_seconds: float | None = None  # retention: session and workspace removed; null: release only
    # a session workspace with neither a record nor a container (its creation died before the
    # record, or the record was lost) is removed this long after it was first seen so
    orphan_workspace_grace_seconds: float = 600.0


class NodeConfig(Base):
    """How nodes are created, probed and retired (XAgent's ``node`` section plus ours)."""

    creation_wait_seconds: float = 30.0
    idling_close_minutes: float | None = 30.0  # idle time before a session's node is stopped; null: never
    # XAgent's manager.yml sets these two; accepted so it loads unchanged, never read: readiness
    # is always our own fast probe of health_path, and Docker's HEALTHCHECK is only recorded
    health_check: bool = True
    health_check_interval: float = 1.0
    port: int = 31942
    health_path: str = "/"
    probe_interval_seconds: float = 0.02
    publish_host: str = "127.0.0.1"  # host address node ports are published on
    advertise_host: str = "127.0.0.1"  # address other replicas reach published ports at
    restart_stopped: bool = True  # a proxied request to a stopped node restarts it
    idle_grace_seconds: float = 60.0
    # a stopped node without a workspace of its own (pooled, or made before sessions had one) is
    # removed after this long; sessions with one are archived instead (tiers.archive_after_seconds)
    exited_gc_minutes: float = 24 * 60.0
    stop_timeout_seconds: int = 5
    read_only_root: bool = False  # superseded by disk.read_only_root; kept for old config files
    workspace_path: str = "/app/workspace"
    # the node image absent from the engine: "missing" pulls it from its registry (at start,
    # then every image_check_seconds while it is missing); "never" waits for it to be loaded
    image_pull: str = "missing"
    image_check_seconds: float = 30.0
    network: NetworkConfig = msgspec.field(default_factory=NetworkConfig)
    disk: DiskConfig = msgspec.field(default_factory=DiskConfig)
    tiers: TiersConfig = msgspec.field(default_factory=TiersConfig)


class DockerConfig(Base):
    """The Docker engine's own settings (engine.kind: docker)."""

    host: str = ""  # empty: DOCKER_HOST or the local socket
    threads: int = 8  # engine calls in flight per replica process (the SDK blocks: each holds a thread)
    # passed to the Docker SDK's containers.create; labels and ports are merged in
    creation_kwargs: dict[str, Any] = msgspec.field(default_factory=_default_creation_kwargs)
    device_requests: list[dict[str, Any]] | None = None
    runtime: str = ""  # an OCI runtime the engine knows (runsc, say); "": the engine's default
    # run the image's HEALTHCHECK in each node (only recorded: readiness is always the manager's own
    # probe). Off by default: each check is an exec into the node (runc, a shim, the check's own
    # process), about 170 ms of CPU on a 2-core host for the reference image's, so 100 idle nodes
    # checked every 10 s took most of both cores. creation_kwargs' own healthcheck wins over this
    image_healthcheck: bool = False


class FakeConfig(Base):
    """The in-memory engine of the unit tests (engine.kind: fake): not a product engine."""

    memory_bytes: int = 8 << 30  # the memory it reports (the node cap is this over node_memory_bytes)
    node_memory_bytes: int = 1 << 30  # the memory limit of one node


class EngineConfig(Base):
    """The container engine nodes run on: its kind, and one section of settings per kind."""

    kind: str = "docker"  # the section below whose engine runs the nodes (shared/engines/<kind>/)
    docker: DockerConfig = msgspec.field(default_factory=DockerConfig)
    fake: FakeConfig = msgspec.field(default_factory=FakeConfig)


def engine_kinds() -> tuple[str, ...]:
    """The engines a configuration may name: one per section of EngineConfig."""
    return tuple(f for f in EngineConfig.__struct_fields__ if f != "kind")


class RedirectPaths(Base):
    post: list[str] = msgspec.field(default_factory=lambda: list(XAGENT_POST_PATHS))
    get: list[str] = msgspec.field(default_factory=lambda: ["/"])


# The project's own Redis (scripts/services.sh start-redis) and the root-only file setup.sh keeps
# its password in: what a configuration that names no Redis gets, as config/manager.yml says.
PROJECT_REDIS_URL = "redis://127.0.0.1:6380/0"
PROJECT_REDIS_PASSWORD_FILE = "/var/lib/toolserver-manager/redis-password"


class RedisConfig(Base):
    # may carry a user and password (redis://user:password@host:port/db); views redact it
    url: str = PROJECT_REDIS_URL
    # a root-only file holding the password (it wins over one in the url): Redis must require
    # one, or any local user reads and rewrites every node record. Empty with the default url:
    # PROJECT_REDIS_PASSWORD_FILE when it exists
    password_file: str = ""
    key_prefix: str = "tsm"
    socket_timeout_seconds: float = 2.0
    # connections per replica process; a command waits up to pool_timeout_seconds for a free one
    # (then 503 naming Redis) instead of failing at once when a burst has them all
    max_connections: int = 100
    pool_timeout_seconds: float = 5.0
    sentinels: list[str] = msgspec.field(default_factory=list)  # "host:port"; url names the master
    sentinel_master: str = "mymaster"
    # "host:port" seeds of a Redis Cluster (any few of its nodes; the rest are discovered): keys get
    # hash tags (README, "Keys on a Redis Cluster"); the url's password and user are the cluster's
    # and its host is not used. Empty: one Redis (or Sentinel), names as they always were
    cluster_nodes: list[str] = msgspec.field(default_factory=list)


class ProxyConfig(Base):
    timeout_seconds: float | None = 600.0  # None: no read timeout (XAgent had none at all)
    connect_timeout_seconds: float = 5.0
    path_timeouts: dict[str, float] = msgspec.field(default_factory=dict)
    max_connections: int = 1000
    address_cache_seconds: float = 30.0
    # how long a cookie Redis does not know is answered 403 without asking Redis again (0: always ask)
    unknown_cookie_cache_seconds: float = 2.0
    activity_flush_seconds: float = 1.0
    max_header_bytes: int = 65536  # request line + headers, counted while they arrive
    header_timeout_seconds: float = 15.0  # a request head must arrive whole within this
    # TCP keep-alive on node connections: a request in flight to a host that vanished ends with a 502
    # about this many seconds (plus 3 one-second probes) after its last byte; 0: the system's (hours)
    keepalive_seconds: float = 5.0
    # a host that did not answer a connection: calls to it fail at once; one goes through (half-open)
    # this often, and a probe connects every circuit_probe_seconds to close it as soon as it answers
    circuit_retry_seconds: float = 5.0
    circuit_probe_seconds: float = 0.5
    websocket_paths: list[str] = msgspec.field(default_factory=lambda: ["/ws/shell", "/ws/echo"])
    # a proxied WebSocket message (either way) over this closes the socket with 1009; a socket holds a
    # few messages at most, so this sets what one costs the replica
    websocket_max_message_bytes: int = 4 << 20
    # sent with every proxied response, so a page a node serves runs in an opaque origin with no
    # script ("sandbox allow-scripts" lets node UIs run script, still in an opaque origin); "": none
    response_csp: str = "sandbox"
    # what a node's answer may cost the replica (a node runs code its session chose: as hostile as
    # a client); past a bound the client gets 502 naming it and the node's connection is dropped
    max_response_head_bytes: int = 65536  # status line + headers of one response
    max_response_headers: int = 100
    max_read_body_bytes: int = 16 << 20  # a node body the manager reads whole (MCP tool calls)
    # a request body that stops arriving for this long (not counting pauses the node's pace
    # imposes) gets 408 and the connection closed, freeing the node connection it holds
    body_timeout_seconds: float = 60.0
    # client connections one replica process holds; past it (or past the per-address cap from one
    # address) a new connection is answered 503 and closed. Lowered at start to what the descriptor
    # limit allows (two per connection); 0 for the per-address cap: none. quota.trusted_proxies
    # (balancers) are under the replica's cap only
    max_client_connections: int = 8192
    max_connections_per_address: int = 1024
    websocket_max_per_session: int = 8  # open proxied sockets of one session on one replica; 0: no cap
    # a client that has not taken a node's message for this long is closed with 1011
    websocket_send_timeout_seconds: float = 30.0


class CheckerConfig(Base):
    lease_ttl_seconds: float = 5.0
    interval_seconds: float = 1.0
    stuck_creation_seconds: float = 120.0
    stop_after_exit: bool = False
    start_jitter_seconds: float = 1.0
    # the lease is renewed from a thread of its own (client load lagging the event loop cannot cost
    # it), but not once the event loop has shown no life for this long (a wedged process)
    loop_stall_seconds: float = 30.0
    use_events: bool = True
    # the cluster-wide upkeep, done by one lease holder a period (checker/upkeep.py): client counts
    # recounted from the records, event streams of manager_ids gone removed; 0: never
    upkeep_seconds: float = 60.0
    # a client's count is corrected only if nothing wrote it, and its records and reservations did not
    # change, for this long (two readings this far apart): longer than a creation's two steps on a cluster
    recount_settle_seconds: float = 5.0


class ClusterConfig(Base):
    heartbeat_seconds: float = 2.0
    replica_ttl_seconds: float = 6.0
    internal_token: str = ""
    internal_token_file: str = ""
    # the key every replica derives node secrets from (shared/nodesecret.py), kept out of Redis;
    # without one, node secrets are random and sit in Redis in clear (as before version 0.4)
    node_secret_key: str = ""
    node_secret_key_file: str = ""
    # live nodes per manager_id. 0: as many as the engine's memory holds at the node memory limit
    # (the engine's, e.g. engine.docker.creation_kwargs.mem_limit; unlimited when nodes have none); -1: unlimited.
    # With isolated node networks never more than 1023, what one bridge holds (a larger value is refused at start)
    max_nodes_per_manager: int = 0
    max_nodes_total: int = 0
    # where a new session goes: "spread": the live manager_id with the fewest nodes (this
    # replica's own among equals); "local": this replica's own; either way one that is full or
    # draining is skipped
    placement: str = "spread"
    # manager_id -> true when its nodes' addresses are not reachable from other replicas
    proxy_through_owner: dict[str, bool] = msgspec.field(default_factory=dict)
    forward_timeout_seconds: float = 60.0
    # no replica of a manager_id live for this long: its host counts as lost and its nodes show as
    # unreachable in every view and metric (as Kubernetes marks a lost node's pods Unknown)
    lost_after_seconds: float = 30.0
    fanout_concurrency: int = 8
    fanout_timeout_seconds: float = 5.0


class AdminConfig(Base):
    token: str = ""
    token_file: str = ""
    console: bool = True  # the operator console under /ui/ (only ever served when a token is set)
    # where scripts/console-assets.sh put the console's npm libraries (xterm.js, uPlot)
    console_assets_dir: str = "/var/lib/toolserver-manager/console-assets"
    console_session_minutes: int = 720  # a console login lasts this long (then: log in again)
    # the console's own origin: a port of its own, so no page a node serves through the proxy
    # port is ever same-origin with it (empty host: the manager's host)
    console_port: int = 8081
    console_host: str = ""
    # wrong admin tokens (bearer, console login) one address may send per window before every
    # attempt from it is refused (429, Retry-After) until the window ends; 0: no limit
    token_failures_per_window: int = 10
    token_failure_window_seconds: float = 60.0
    # origins besides the request's own (scheme-less host:port match) allowed to act through
    # the console, e.g. https://ops.example.com when a proxy in front rewrites Host
    console_origins: list[str] = msgspec.field(default_factory=list)


class ClientAuthConfig(Base):
    """Optional API keys for clients: off when none is set (XAgent's client sends none)."""

    api_keys: list[str] = msgspec.field(default_factory=list)
    api_keys_file: str = ""  # one key per line
    header: str = "X-API-Key"
    cookie: str = "tsm_api_key"  # for clients that cannot set headers (browsers' WebSockets)


class QuotaConfig(Base):
    """Live sessions per client. A client is its API key (header or cookie) when keys are set, else
    client_header's value when set, else its address (see trusted_proxies)."""

    client_header: str = ""  # without API keys: this header's value identifies a client
    # null: a quarter of this manager_id's node cap (at least 1), so one client cannot take a
    # host; 0: unlimited
    per_client: int | None = None
    # balancers whose X-Forwarded-For is believed (CIDRs): behind one not listed, every client
    # has the balancer's address and is one client
    trusted_proxies: list[str] = msgspec.field(default_factory=list)


class ForkConfig(Base):
    """Forks (a session copied into new ones) and snapshots (a session's workspace saved by name);
    both need bounded workspaces (node.disk.workspace_bytes)."""

    max_count: int = 16  # copies one fork request may ask for
    # disk all snapshots of this manager_id may take on its host (sparse: what was written); 0: no bound
    snapshot_bytes: int = 20 << 30
    snapshots_per_client: int = 20  # snapshots one client may keep; 0: no bound


class PoolConfig(Base):
    """Ready nodes waiting for clients (nodeops/pool.py), sized by recent demand (nodeops/demand.py)."""

    size: int = 0  # ready nodes kept per manager_id at least; 0 (and max_size 0): no pool
    # the most the pool grows to when the recent arrival rate asks for more; 0: stays at size
    max_size: int = 0
    # the pool holds what the recent arrival rate asks for over this long (at least one creation's time)
    demand_seconds: float = 10.0
    demand_half_life_seconds: float = 10.0  # how fast the arrival rate forgets (an EWMA's half-life)
    # the pool also holds the largest burst (arrivals within one creation's time) seen this long; 0: off
    burst_memory_seconds: float = 600.0
    refill_concurrency: int = 4  # pooled nodes created at once at most (fewer while demand is low)
    # a refill's creation starts only once no creation request (a claim or a miss) arrived for this
    # long, so clients' claims and first calls do not share the CPU with a refill's boot ...
    refill_quiet_seconds: float = 0.5
    # ... but waits for that at most this long: under steady demand the pool still refills; 0: never waits
    refill_defer_seconds: float = 5.0
    max_age_seconds: float = 3600.0  # pooled nodes that answered longer ago than this are recycled
    claim_timeout_seconds: float = 30.0  # a claimed node not delivered by then is released
    # a request sent to each pooled node once it answers, before a client can claim it, so the
    # client's first call does not pay the node's own first-call work (the reference node imports
    # a tool's module on its first use: ~30 ms). Its answer is not read; "" as path: none
    warm_up_path: str = "/execute_tool"
    warm_up_body: str = '{"tool_name": "FileSystemEnv_print_filesys_struture", "arguments": {}}'

    @property
    def enabled(self) -> bool:
        return max(self.size, self.max_size) > 0


class CreationConfig(Base):
    """How many new nodes one engine (manager_id) starts at once across all its replica processes,
    and how many wait (nodeops/admission.py, held in Redis)."""

    concurrency: int = 4  # creations running at once on the engine; more wait their turn, round-robin by client
    # client creations waiting on the engine; one more gets 503 with Retry-After
    queue_size: int = 64
    # a slot or a place in the queue is leased for this long and renewed by its process: one killed
    # frees what it held after this
    lease_seconds: float = 10.0


class EventsConfig(Base):
    stream_maxlen: int = 10000  # the cluster-wide stream (views of the whole cluster), entries kept
    manager_stream_maxlen: int = 1000  # each manager_id's own stream (what its replicas read), entries kept
    # a manager_id's stream is removed once no replica of it sent a heartbeat, it wrote no event and
    # it holds no session for this long (checker.upkeep_seconds does it)
    gone_stream_grace_seconds: float = 3600.0
    keepalive_seconds: float = 20.0
    client_timeout_seconds: float = 60.0
    stop_after_unwatched_seconds: float | None = None


class McpConfig(Base):
    """The MCP gateway at /mcp (Streamable HTTP, revisions 2025-11-25 and 2026-07-28)."""

    enabled: bool = True
    # browsers' Origins allowed to call /mcp (exact, e.g. https://app.example); a request with
    # any other Origin gets 403 (DNS rebinding). Requests without Origin (non-browser) pass.
    allowed_origins: list[str] = msgspec.field(default_factory=list)
    max_message_bytes: int = 4 << 20  # a JSON-RPC message over this is refused (413)
    session_ttl_seconds: float = 7 * 86400.0  # an MCP session unused this long is forgotten
    stream_ttl_seconds: float = 600.0  # how long a stream's events stay resumable after its last one
    progress_interval_seconds: float = 1.0  # progress notifications of a running call that asked for them
    retry_ms: int = 500  # the SSE retry hint: how soon a client reconnects a dropped stream
    # close a call's SSE response after this long (the client resumes it with Last-Event-ID, on
    # any replica): keeps streams shorter than a balancer's idle timeout; 0: keep it open
    stream_close_seconds: float = 0.0
    tools_ttl_seconds: float = 60.0  # how long clients may cache tools/list (2026-07-28)


class EgressConfig(Base):
    """Per-session egress by name (see the README's "Egress" section and shared/egress/)."""

    # run this host's egress resolver and per-session firewall sets for node.network's bridge:
    # nodes resolve through the manager, only what resolved for an allowed name is reachable.
    # Needs root and nft; off: a policy is kept and shown, and only the bridge's egress mode holds
    enforce: bool = False
    # the policy of a session given none: the public internet (what egress "open" always meant)
    default: EgressPolicy = msgspec.field(default_factory=EgressPolicy)
    # clients may give a policy at /get_cookie and change their session's at /egress_policy;
    # with policy_api_keys set, only clients with one of those API keys (admins always may)
    client_may_set: bool = False
    policy_api_keys: list[str] = msgspec.field(default_factory=list)
    # where the resolver asks for allowed names ("ip" or "ip:port"); empty: /etc/resolv.conf's
    upstream_dns: list[str] = msgspec.field(default_factory=list)
    dns_port: int = 53  # on the node bridge's own address (the engine's --dns takes no port)
    # the transparent proxy that checks SNI/Host on 80 and 443 of deny-by-default sessions, on the
    # node bridge's address; 0: off (an address opened for one name is then open for any name)
    proxy_port: int = 15001
    # 443 of those sessions while no secret needs their TLS terminated: the ClientHello's SNI is
    # checked in the kernel's packet queue (NFQUEUE) by the same rule and the connection is then
    # forwarded by the kernel, not spliced through the proxy (no second TCP termination); false:
    # all of it through the proxy
    tls_queue: bool = True
    # an answer opens its addresses for its TTL, held within these bounds (a 0-second TTL would
    # close the address before the node connects)
    min_ttl_seconds: int = 5
    max_ttl_seconds: int = 3600
    # refusals of one session written as egress_refused events, at most this many a minute (a loop
    # cannot flood the stream); the rest are counted in metrics only
    audit_events_per_minute: int = 30
    # secrets outside nodes (shared/egress/secrets.py): the key that seals them in Redis (any string,
    # or a file holding it); without one, secrets cannot be stored
    secrets_key: str = ""
    secrets_key_file: str = ""
    # earlier keys, still read while secrets are rotated to the current one (new writes and
    # POST /admin/secrets/rotate seal with secrets_key); a file holds one key a line
    secrets_old_keys: list[str] = msgspec.field(default_factory=list)
    secrets_old_keys_file: str = ""
    # node environment variable -> secret name: the node sees "tsm-secret:<name>" there
    secret_env: dict[str, str] = msgspec.field(default_factory=dict)
    # the per-cluster CA the proxy signs its certificates for bound hosts with; nodes get a CA
    # bundle (the host's CAs plus this one) mounted and named in SSL_CERT_FILE
    ca_cert_file: str = ""
    ca_key_file: str = ""
    # CAs the proxy trusts for the real hosts ("": the host's own)
    upstream_ca_file: str = ""
    ca_bundle_dir: str = "/var/lib/toolserver-manager/egress"


class Config(Base):
    """Everything a manager replica or a standalone checker reads at start."""

    version: str = __version__
    logger: str = "toolserver"  # XAgent's logger name: accepted so its manager.yml loads, never read
    logger_level: int | str = "INFO"
    log_format: str = "logfmt"  # or json
    builtin_monitor: bool = True  # run the checker inside the manager
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    manager_id: str = msgspec.field(default_factory=socket.gethostname)
    replica_id: str = ""
    advertise_url: str = ""
    engine: EngineConfig = msgspec.field(default_factory=EngineConfig)
    node: NodeConfig = msgspec.field(default_factory=NodeConfig)
    redirect_to_node_path: RedirectPaths = msgspec.field(default_factory=RedirectPaths)
    redis: RedisConfig = msgspec.field(default_factory=RedisConfig)
    proxy: ProxyConfig = msgspec.field(default_factory=ProxyConfig)
    checker: CheckerConfig = msgspec.field(default_factory=CheckerConfig)
    cluster: ClusterConfig = msgspec.field(default_factory=ClusterConfig)
    admin: AdminConfig = msgspec.field(default_factory=AdminConfig)
    pool: PoolConfig = msgspec.field(default_factory=PoolConfig)
    fork: ForkConfig = msgspec.field(default_factory=ForkConfig)
    creation: CreationConfig = msgspec.field(default_factory=CreationConfig)
    quota: QuotaConfig = msgspec.field(default_factory=QuotaConfig)
    client_auth: ClientAuthConfig = msgspec.field(default_factory=ClientAuthConfig)
    events: EventsConfig = msgspec.field(default_factory=EventsConfig)
    mcp: McpConfig = msgspec.field(default_factory=McpConfig)
    egress: EgressConfig = msgspec.field(default_factory=EgressConfig)

    def __post_init__(self) -> None:
        if not self.replica_id:
            self.replica_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        if not self.advertise_url:
            self.advertise_url = f"http://{self.host}:{self.port}"
        if not self.manager_id or ":" in self.manager_id:
            raise ValueError("manager_id must be non-empty and contain no ':'")
        if self.checker.lease_ttl_seconds <= self.checker.interval_seconds:
            raise ValueError("checker.lease_ttl_seconds must exceed checker.interval_seconds")
        if self.node.creation_wait_seconds <= 0:
            raise ValueError("node.creation_wait_seconds must be positive")
        if self.node.network.egress not in EGRESS_MODES:
            raise ValueError(f"node.network.egress must be one of {', '.join(EGRESS_MODES)}, "
                             f"not {self.node.network.egress!r}")
        if self.cluster.placement not in PLACEMENTS:
            raise ValueError(f"cluster.placement must be one of {', '.join(PLACEMENTS)}, "
                             f"not {self.cluster.placement!r}")
        if self.node.image_pull not in IMAGE_PULL_POLICIES:
            raise ValueError(f"node.image_pull must be one of {', '.join(IMAGE_PULL_POLICIES)}, "
                             f"not {self.node.image_pull!r}")
        if not str(self.engine.docker.creation_kwargs.get("image") or ""):
            raise ValueError("engine.docker.creation_kwargs.image must name the node image")
        kinds = engine_kinds()
        if self.engine.kind not in kinds:
            raise ValueError(f"engine.kind must be one of {', '.join(kinds)}, not {self.engine.kind!r}")
        for cidr in self.quota.trusted_proxies:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"quota.trusted_proxies: {cidr!r} is not an address range") from None
        for cidr in self.node.network.allow_cidrs:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"node.network.allow_cidrs: {cidr!r} is not an address range") from None
        try:
            self.egress.default = egress_policy.validate(msgspec.to_builtins(self.egress.default))
        except ManagerError as exc:
            raise ValueError(f"egress.default: {exc.detail}") from None
        if self.egress.enforce and not self.node.network.isolated:
            raise ValueError("egress.enforce needs node.network.isolated: its resolver listens on the node bridge")
        if not 0 < self.egress.min_ttl_seconds <= self.egress.max_ttl_seconds:
            raise ValueError("egress.min_ttl_seconds must be positive and at most egress.max_ttl_seconds")
        t = self.node.tiers
        for key, value in (("node.idling_close_minutes", self.node.idling_close_minutes),
                           ("node.tiers.pause_after_seconds", t.pause_after_seconds),
                           ("node.tiers.archive_after_seconds", t.archive_after_seconds),
                           ("node.tiers.delete_after_seconds", t.delete_after_seconds)):
            if value is not None and value <= 0:
                raise ValueError(f"{key} must be positive, or null to turn that tier off")
        if self.engine.kind == "docker" and self.node.network.isolated \
                and self.cluster.max_nodes_per_manager > BRIDGE_MAX_NODES:
            raise ValueError(f"cluster.max_nodes_per_manager: {self.cluster.max_nodes_per_manager} is over the "
                             f"{BRIDGE_MAX_NODES} nodes one node network holds (a Linux bridge has 1024 ports, "
                             "and node.network.isolated gives each manager_id one bridge): set it to "
                             f"{BRIDGE_MAX_NODES} or less and run more manager_ids for more")
        if self.node.disk.workspace_bytes and self.node.disk.workspace_bytes < 16 << 20:
            raise ValueError("node.disk.workspace_bytes must be 0 (unbounded) or at least 16 MiB")
        if self.pool.refill_quiet_seconds < 0 or self.pool.refill_defer_seconds < 0:
            raise ValueError("pool.refill_quiet_seconds and pool.refill_defer_seconds must not be negative")
        if self.creation.concurrency < 1 or self.creation.queue_size < 0 or self.creation.lease_seconds < 1:
            raise ValueError("creation.concurrency and creation.lease_seconds must be at least 1 and "
                             "creation.queue_size at least 0")
        p = self.pool
        if min(p.size, p.max_size, p.refill_concurrency - 1) < 0 or p.demand_seconds < 0 \
                or p.demand_half_life_seconds <= 0:
            raise ValueError("pool.size and pool.max_size must be 0 or more, pool.refill_concurrency at least 1, "
                             "pool.demand_seconds 0 or more and pool.demand_half_life_seconds positive")
        if not 0 < self.admin.console_port < 65536 or self.admin.console_port == self.port:
            raise ValueError("admin.console_port must be a port other than port: the console needs an "
                             "origin of its own, apart from the pages nodes serve")

    @property
    def internal_token(self) -> str:
        return _secret(self.cluster.internal_token, self.cluster.internal_token_file)

    @property
    def node_secret_key(self) -> str:
        return _secret(self.cluster.node_secret_key, self.cluster.node_secret_key_file)

    @property
    def egress_secrets_key(self) -> str:
        return _secret(self.egress.secrets_key, self.egress.secrets_key_file)

    @property
    def egress_secrets_old_keys(self) -> list[str]:
        keys = list(self.egress.secrets_old_keys)
        path = self.egress.secrets_old_keys_file
        if path:
            try:
                keys += [k.strip() for k in Path(path).read_text().splitlines() if k.strip()]
            except OSError as exc:
                raise ConfigError(f"cannot read egress.secrets_old_keys_file {path}: {exc.strerror}") from exc
        return keys

    @property
    def admin_token(self) -> str:
        return _secret(self.admin.token, self.admin.token_file)

    @property
    def api_keys(self) -> list[str]:
        keys = list(self.client_auth.api_keys)
        path = self.client_auth.api_keys_file
        if path:
            try:
                keys += [k.strip() for k in Path(path).read_text().splitlines() if k.strip()]
            except OSError as exc:
                raise ConfigError(f"cannot read client_auth.api_keys_file {path}: {exc.strerror}") from exc
        return keys

    @property
    def redis_password(self) -> str | None:
        """The password from redis.password_file (None: the url's own, if any)."""
        path = self.redis.password_file
        if not path and self.redis.url == PROJECT_REDIS_URL and Path(PROJECT_REDIS_PASSWORD_FILE).is_file():
            path = PROJECT_REDIS_PASSWORD_FILE  # no Redis named: the project's own, with its password
        return _secret("", path) or None

    def redacted(self) -> dict[str, Any]:
        """The configuration as plain data with every secret replaced."""
        data = msgspec.to_builtins(self)
        data["redis"]["url"] = redact_url(data["redis"]["url"])
        data["client_auth"]["api_keys"] = ["***" for _ in data["client_auth"]["api_keys"]]
        data["egress"]["policy_api_keys"] = ["***" for _ in data["egress"]["policy_api_keys"]]
        if data["egress"]["secrets_key"]:
            data["egress"]["secrets_key"] = "***"
        data["egress"]["secrets_old_keys"] = ["***" for _ in data["egress"]["secrets_old_keys"]]
        for section, key in (("cluster", "internal_token"), ("cluster", "node_secret_key"), ("admin", "token")):
            if data[section][key]:
                data[section][key] = "***"
        return data


def redact_url(url: str) -> str:
    """The URL with the password of its userinfo (user:password@) replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}:" if parts.username else ":"
    return urlunsplit(parts._replace(netloc=f"{user}***@{parts.netloc.rsplit('@', 1)[1]}"))


def _secret(value: str, path: str) -> str:
    if value or not path:
        return value
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read secret file {path}: {exc.strerror}") from exc


ENV_PREFIX = "TSM_"


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    top = set(Config.__struct_fields__) | {old[0] for old in RENAMED if len(old) == 1}
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if name.startswith(ENV_PREFIX) and name not in ("TSM_CONFIG",):
            path = name[len(ENV_PREFIX):].lower().split("__")
        elif name in top:  # XAgent's rule: a top-level key by its own name
            path = [name]
        else:
            continue
        if path[0] not in top:
            continue  # TSM_* variables of the scripts (TSM_STATE_DIR, ...) are not config
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Merge over into base, nested dicts key by key; returns base."""
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def load_config(path: str | os.PathLike[str] | None = None, environ: dict[str, str] | None = None,
                overrides: dict[str, Any] | None = None) -> Config:
    """Load the config from YAML (path or ``TSM_CONFIG``), the environment and overrides."""
    environ = dict(os.environ if environ is None else environ)
    path = path or environ.get("TSM_CONFIG")
    data: dict[str, Any] = {}
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping")
        data = loaded or {}
    deep_merge(data, _env_overrides(environ))
    deep_merge(data, overrides or {})
    return config_from_dict(data)


# keys that moved: old path -> new path. An old key is still read (XAgent's manager.yml has
# node.creation_kwargs) and said once in the log; merged over the new key when both are given, as
# the chart's values.yaml gives the new one and a user's older values file the old one
RENAMED: dict[tuple[str, ...], tuple[str, ...]] = {
    ("docker_host",): ("engine", "docker", "host"),
    ("docker_threads",): ("engine", "docker", "threads"),
    ("node", "creation_kwargs"): ("engine", "docker", "creation_kwargs"),
    ("node", "device_requests"): ("engine", "docker", "device_requests"),
    ("node", "runtime"): ("engine", "docker", "runtime"),
}


def _move_renamed(data: dict[str, Any]) -> None:
    """Move every old key of data to its new place, logging one line for each."""
    for old, new in RENAMED.items():
        parent = data
        for part in old[:-1]:
            parent = parent.get(part) if isinstance(parent.get(part), dict) else None  # type: ignore[assignment]
            if parent is None:
                break
        if parent is None or old[-1] not in parent:
            continue
        value = parent.pop(old[-1])
        target = data
        for part in new[:-1]:
            target = target.setdefault(part, {})
        if isinstance(value, dict) and isinstance(target.get(new[-1]), dict):
            deep_merge(target[new[-1]], value)
        else:
            target[new[-1]] = value
        log.warning("config_key_deprecated old=%s new=%s", ".".join(old), ".".join(new))


def config_from_dict(data: dict[str, Any]) -> Config:
    """Validate plain data into a Config; the error names the offending key."""
    # XAgent's manager.yml carries node.creation_kwargs with an image and a network we do not need
    data = copy.deepcopy(data)
    _move_renamed(data)
    try:
        return msgspec.convert(data, Config, str_keys=True)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid config: {exc}") from exc
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"invalid config: {exc}") from exc
