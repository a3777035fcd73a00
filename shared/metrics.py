"""Every Prometheus metric of the project, in one module.

One prefix, base units, ``_total`` on counters, low-cardinality labels (never a node
id). Gauges counted from Redis are set only by the lease holder, so a ``sum()`` over
replicas is right. With several uvicorn workers, prometheus-client's multiprocess
mode is used (PROMETHEUS_MULTIPROC_DIR, set by the run command).
"""

from __future__ import annotations

import asyncio
import bisect
import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

P = "toolserver_"
MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

CREATE_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0)
PROXY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0)

NODE_CREATE_SECONDS = Histogram(
    P + "node_create_duration_seconds", "Time from a creation request to a node answering, by outcome.",
    ["outcome"], buckets=CREATE_BUCKETS)
for _o in ("ready", "timeout", "error", "pool"):
    NODE_CREATE_SECONDS.labels(_o)

FORK_SECONDS = Histogram(P + "fork_duration_seconds", "Time from a fork request until every copy answers, by "
                         "outcome.", ["outcome"], buckets=CREATE_BUCKETS)
SNAPSHOT_SECONDS = Histogram(P + "snapshot_duration_seconds", "Time to save a session's workspace as a snapshot.",
                             buckets=CREATE_BUCKETS)
# the part of a fork or snapshot during which the source's writes wait (its reads are served)
SOURCE_STALL_SECONDS = Histogram(P + "fork_source_stall_seconds", "Time a fork's or snapshot's source held its "
                                 "writes, by operation.", ["op"], buckets=PROXY_BUCKETS)
for _o in ("ok", "partial", "error", "quota"):
    FORK_SECONDS.labels(_o)
for _o in ("fork", "snapshot"):
    SOURCE_STALL_SECONDS.labels(_o)
# the phases of a creation (nodeops/lifecycle.py; shared/phases.py), to find where a slow one spent it.
# The node network is attached by the engine's start (Docker connects a container's endpoints then)
CREATE_PHASES = ("queue", "record", "workspace", "create", "start", "probe", "ready_write")
NODE_CREATE_PHASE_SECONDS = Histogram(
    P + "node_create_phase_duration_seconds", "Time a node creation spent in each phase (queue: waiting for "
    "a creation slot).", ["phase"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0, 1.5,
                                             2.0, 3.0, 5.0, 10.0, 30.0))
for _ph in CREATE_PHASES:
    NODE_CREATE_PHASE_SECONDS.labels(_ph)
CREATE_QUEUE_DEPTH = Gauge(P + "create_queue_depth", "Client creations waiting for the engine's creation slots (this "
                           "process: nodeops/admission.py).", multiprocess_mode="livesum")
CREATES_RUNNING = Gauge(P + "creates_in_progress", "Creations holding a slot (clients' and pool refills').",
                        multiprocess_mode="livesum")
CREATE_QUEUE_WAIT_SECONDS = Histogram(P + "create_queue_wait_seconds", "Time a creation waited for its slot, "
                                      "by kind (client, refill).", ["kind"], buckets=CREATE_BUCKETS)
for _k in ("client", "refill"):
    CREATE_QUEUE_WAIT_SECONDS.labels(_k)
CREATE_QUEUE_REJECTED = Counter(P + "create_queue_rejected_total",
                                "Creations refused with 503 because the creation queue was full.")

EGRESS_REFUSED = Counter(P + "egress_refused_total", "Egress refused by the host agent, by where: dns (NXDOMAIN "
                         "for a name outside the policy), proxy (SNI/Host not allowed for the address) or tls "
                         "(the kernel queue's ClientHello check on 443).", ["where"])
EGRESS_TLS_CHECKED = Counter(P + "egress_tls_checked_total", "TLS connections on 443 whose ClientHello the egress "
                             "agent checked in the kernel's queue, by verdict: allowed (then forwarded by the "
                             "kernel) or refused.", ["verdict"])
EGRESS_RESOLVED = Counter(P + "egress_resolved_total", "Allowed names the egress resolver answered.")
EGRESS_POLICY_CHANGES = Counter(P + "egress_policy_changes_total", "Session egress policies changed, by who.",
                                ["by"])
EGRESS_APPLY_SECONDS = Histogram(P + "egress_policy_apply_seconds", "Time from a policy change's event to its "
                                 "rules in force on the node's host.", buckets=PROXY_BUCKETS)
EGRESS_EVENTS_DROPPED = Counter(P + "egress_audit_events_dropped_total", "Egress refusals not written as events "
                                "(over egress.audit_events_per_minute for their session); still counted above.")
EGRESS_SECRETS = Counter(P + "egress_secret_uses_total", "Secret placeholders the egress proxy saw, by what it did: "
                         "used (replaced for a bound host) or unbound (sent on unreplaced).", ["what"])
for _w in ("dns", "proxy", "tls"):
    EGRESS_REFUSED.labels(_w)
for _w in ("allowed", "refused"):
    EGRESS_TLS_CHECKED.labels(_w)
for _w in ("used", "unbound"):
    EGRESS_SECRETS.labels(_w)
for _b in ("client", "admin"):
    EGRESS_POLICY_CHANGES.labels(_b)

PROXY_REQUESTS = Counter(P + "proxy_requests_total", "Requests proxied to nodes, by route and status class.",
                         ["route", "code"])
PROXY_SECONDS = Histogram(P + "proxy_request_duration_seconds",
                          "Time to the response headers of a proxied request, by route.", ["route"],
                          buckets=PROXY_BUCKETS)
PROXY_BYTES_IN = Counter(P + "proxy_received_bytes_total", "Request body bytes streamed to nodes.")
PROXY_BYTES_OUT = Counter(P + "proxy_sent_bytes_total", "Response body bytes streamed back to clients.")
UPSTREAM_OPEN = Gauge(P + "proxy_upstream_connections", "Open connections from the proxy to nodes.",
                      multiprocess_mode="livesum")
UPSTREAM_BUSY = Gauge(P + "proxy_upstream_connections_busy",
                      "Connections to nodes held by a request (the rest are idle in the pool).",
                      multiprocess_mode="livesum")
WEBSOCKETS = Gauge(P + "websocket_connections", "Open client WebSocket connections, by kind.", ["kind"],
                   multiprocess_mode="livesum")
for _k in ("proxy", "events"):
    WEBSOCKETS.labels(_k)

SESSION_OPS = Counter(P + "session_operations_total", "Session lifecycle calls, by operation and result.",
                      ["op", "result"])
FORWARDED = Counter(P + "forwarded_requests_total", "Calls forwarded to a replica of another manager_id.",
                    ["kind"])

INTENTS = Counter(P + "intents_total", "Lifecycle calls recorded for an unreachable owner, and what became of "
                  "them (recorded, done, superseded).", ["op", "result"])

CIRCUIT_OPEN = Gauge(P + "circuit_open_hosts", "Hosts whose circuit is open in this process (calls fail fast).",
                     multiprocess_mode="livesum")
CIRCUIT_TRANSITIONS = Counter(P + "circuit_transitions_total", "Host circuits opened and closed.", ["to"])
for _t in ("open", "closed"):
    CIRCUIT_TRANSITIONS.labels(_t)
CIRCUIT_REJECTED = Counter(P + "circuit_rejected_total", "Calls refused at once because their host's circuit "
                           "was open.")
MANAGER_LOST = Gauge(P + "manager_lost", "1 when no replica of the manager_id has been live for "
                     "cluster.lost_after_seconds (its host counts as lost).", ["manager_id"],
                     multiprocess_mode="livemax")
NODES_UNREACHABLE = Gauge(P + "nodes_unreachable", "Node records of a lost manager_id (shown as unreachable).",
                          ["manager_id"], multiprocess_mode="livemax")

NODES = Gauge(P + "nodes", "Node records by status and manager_id (exported by the lease holder only).",
              ["manager_id", "status"], multiprocess_mode="livemax")
LEADER = Gauge(P + "checker_leader", "1 while this process holds the checker lease of its manager_id.",
               ["manager_id"], multiprocess_mode="livesum")
LEASE_TRANSITIONS = Counter(P + "checker_lease_transitions_total",
                            "Lease acquisitions and losses by this process.", ["manager_id", "event"])
CLIENT_COUNTS_CORRECTED = Counter(P + "client_counts_corrected_total", "Client quota counts the upkeep set back to "
                                  "what the client's records and reservations hold (a write lost to a failover, or a "
                                  "replica that died between a cluster's two steps).")
EVENT_STREAMS_REMOVED = Counter(P + "event_streams_removed_total", "Event streams of manager_ids gone (no replica, "
                                "session or event for events.gone_stream_grace_seconds) the upkeep removed.")
CHECKER_CYCLE_SECONDS = Histogram(P + "checker_cycle_duration_seconds", "Duration of one reconcile cycle.",
                                  ["manager_id"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
CHECKER_ACTIONS = Counter(P + "checker_actions_total", "What the checker did, by action.",
                          ["manager_id", "action"])
REPLICAS = Gauge(P + "replicas_alive", "Live replicas seen in the registry (lease holder only).",
                 ["manager_id"], multiprocess_mode="livemax")
POOL_SIZE = Gauge(P + "pool_nodes", "Ready pooled nodes waiting to be claimed (lease holder only).",
                  ["manager_id"], multiprocess_mode="livemax")
TIER_TRANSITIONS = Counter(P + "session_tier_transitions_total",
                           "Sessions the checker moved to an idle tier (paused, stopped, archived, deleted).",
                           ["manager_id", "tier"])
RESUME_SECONDS = Histogram(P + "session_resume_duration_seconds",
                           "Time to bring a session back to running, by the tier it left.", ["tier"],
                           buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0))
for _t in ("paused", "stopped", "archived"):
    RESUME_SECONDS.labels(_t)
POOL_TARGET = Gauge(P + "pool_target_nodes", "Pooled nodes the checker aims for, from the recent arrival "
                    "rate (lease holder only).", ["manager_id"], multiprocess_mode="livemax")
POOL_ARRIVAL_RATE = Gauge(P + "pool_arrival_rate", "Recent creation requests per second of the manager_id "
                          "(EWMA; lease holder only).", ["manager_id"], multiprocess_mode="livemax")
POOL_BURST_PEAK = Gauge(P + "pool_burst_peak", "The most creation requests within one creation's time seen "
                       "over pool.burst_memory_seconds (lease holder only).", ["manager_id"],
                       multiprocess_mode="livemax")
POOL_REFILL_IN_FLIGHT = Gauge(P + "pool_refill_in_flight", "Pooled nodes being created now (lease holder only).",
                              ["manager_id"], multiprocess_mode="livemax")
POOL_CLAIMS = Counter(P + "pool_claims_total", "get_cookie served from the warm pool (hit) or not (miss).",
                      ["result"])
for _r in ("hit", "miss"):
    POOL_CLAIMS.labels(_r)


def status_class(code: int) -> str:
    return f"{code // 100}xx"

MCP_REQUESTS = Counter(P + "mcp_requests_total",
                       "MCP gateway messages by method and outcome (ok or the JSON-RPC error code).",
                       ["method", "outcome"])
MCP_SECONDS = Histogram(P + "mcp_request_duration_seconds", "Time to answer an MCP request, by method.",
                        ["method"], buckets=PROXY_BUCKETS)
MCP_RESUMES = Counter(P + "mcp_stream_resumes_total",
                      "SSE streams resumed with Last-Event-ID, by outcome (complete, lost: the call's "
                      "replica died).", ["outcome"])


def clear(gauge: Gauge, *labels: str) -> None:
    """Drop a gauge's labelled child (zero it in multiprocess mode, which cannot remove)."""
    if MULTIPROCESS:
        gauge.labels(*labels).set(0)
        return
    try:
        gauge.remove(*labels)
    except KeyError:
        pass


class Deferred:
    """Increments of counters and gauges added up in plain ints and applied at most `delay` seconds
    later (or at once before /metrics renders in this process): the proxy's per-request byte counts
    and busy connections cost a dict update instead of prometheus_client's checks and lock each."""

    def __init__(self, delay: float = 0.25) -> None:
        self.delay = delay
        self._pending: dict[Any, float] = {}
        self._observed: dict[Any, list[Any]] = {}  # histogram -> [sum, its bounds, count per bucket]
        self._armed = False
        _DEFERRED.append(self)

    def inc(self, metric: Counter | Gauge, amount: float = 1) -> None:
        """metric.inc(amount), soon (a gauge's may be negative)."""
        pending = self._pending
        pending[metric] = pending.get(metric, 0) + amount
        if not self._armed:
            self._arm()

    def observe(self, histogram: Histogram, amount: float) -> None:
        """histogram.observe(amount) (a labelled child), soon: its bucket found by bisection and
        counted in a list, applied with the increments."""
        pending = self._observed.get(histogram)
        if pending is None:
            bounds = histogram._upper_bounds  # what observe() compares against, in order
            pending = self._observed[histogram] = [0.0, bounds, [0] * len(bounds)]
        pending[0] += amount
        pending[2][bisect.bisect_left(pending[1], amount)] += 1  # the first bound >= amount
        if not self._armed:
            self._arm()

    def answered(self, histogram: Histogram, amount: float, counter: Counter, sent_metric: Counter,
                 sent: int) -> None:
        """observe(histogram, amount), inc(counter) and, when sent, inc(sent_metric, sent): a proxied
        answer's three counts in one call."""
        self.observe(histogram, amount)
        pending = self._pending
        pending[counter] = pending.get(counter, 0) + 1
        if sent:
            pending[sent_metric] = pending.get(sent_metric, 0) + sent

    def _arm(self) -> None:
        try:
            asyncio.get_running_loop().call_later(self.delay, self.flush)
        except RuntimeError:  # no event loop (a unit test): applied at once
            self.flush()
            return
        self._armed = True

    def flush(self) -> None:
        self._armed = False
        pending, self._pending = self._pending, {}
        for metric, amount in pending.items():
            if amount:
                metric.inc(amount)
        observed, self._observed = self._observed, {}
        for hist, (total, _, counts) in observed.items():
            # what observe() does once per amount, once per bucket (the same values the exposition reads)
            hist._sum.inc(total)
            for i, n in enumerate(counts):
                if n:
                    hist._buckets[i].inc(n)


_DEFERRED: list[Deferred] = []
DEFERRED = Deferred()  # the proxy's


def render() -> tuple[bytes, str]:
    """The exposition text for /metrics, aggregated over workers in multiprocess mode."""
    for d in _DEFERRED:
        d.flush()
    if MULTIPROCESS:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
