"""Every Redis key name, built in one place under a configurable prefix.

On one Redis (the default) the names are as they always were. On a Redis Cluster
(``cluster=True``) each name carries a hash tag choosing its slot, so that every script and
every MULTI touches one slot (README, "Keys on a Redis Cluster"):
- a manager_id's keys (indexes, lease, fence, pool, intents) are tagged with its *home*, four hex
  digits of a hash of the manager_id; the ids of the sessions it creates start with those four
  digits and a session's keys (record, watchers, lock) are tagged with its id's first four, so a
  manager's records share the slot of its indexes and its checker's fenced writes;
- the replica registry (replicas, manager ids seen, draining) is one tag, snapshot metadata
  another, the cluster-wide events stream and the broadcast stream a third; a manager_id's own
  events stream is in its home; a client's live-session count is a key of its own per client
  (a client's quota spans manager_ids: the store takes it in two steps, see quotas.py);
- an MCP session's keys are tagged with its token hash.
"""

from __future__ import annotations

import hashlib
import re
import secrets

HOME_DIGITS = 4  # hex digits of a session id that name its manager's slot on a cluster


def home(manager_id: str) -> str:
    """The four hex digits that place a manager_id's keys (and its sessions') on a cluster."""
    return hashlib.sha1(manager_id.encode()).hexdigest()[:HOME_DIGITS]


class Keys:
    def __init__(self, prefix: str, cluster: bool = False) -> None:
        self.prefix = prefix
        self.cluster = cluster

    def _t(self, tag: str) -> str:
        """The prefix with a hash tag on a cluster; the bare prefix on one Redis."""
        return f"{self.prefix}:{{{tag}}}" if self.cluster else self.prefix

    def _m(self, manager_id: str) -> str:
        return self._t(home(manager_id))

    def _n(self, node_id: str) -> str:
        return self._t(node_id[:HOME_DIGITS])

    def new_session_id(self, manager_id: str) -> str:
        """A new session id (64 hex digits, as a container id): on a cluster it starts with its
        manager's home, so its record lands in the slot of the manager's indexes."""
        if not self.cluster:
            return secrets.token_hex(32)
        return home(manager_id) + secrets.token_hex(32)[HOME_DIGITS:]

    def node(self, node_id: str) -> str:
        """Hash: one node record, written field by field."""
        return f"{self._n(node_id)}:node:{node_id}"

    def manager_nodes(self, manager_id: str) -> str:
        """Set: ids of the nodes a manager_id owns."""
        return f"{self._m(manager_id)}:mgr:{manager_id}:nodes"

    def archived(self, manager_id: str) -> str:
        """Set: ids of a manager's archived sessions (they hold no container: not counted by quotas)."""
        return f"{self._m(manager_id)}:mgr:{manager_id}:archived"

    def last_request(self, manager_id: str) -> str:
        """Sorted set: node id scored by last request time (idle scan is one range query)."""
        return f"{self._m(manager_id)}:mgr:{manager_id}:last_request"

    def lease(self, manager_id: str) -> str:
        """String 'replica_id:token' with a TTL: the checker lease."""
        return f"{self._m(manager_id)}:mgr:{manager_id}:lease"

    def fence(self, manager_id: str) -> str:
        """Counter bumped at each lease acquisition: the fencing token."""
        return f"{self._m(manager_id)}:mgr:{manager_id}:fence"

    def lease_info(self, manager_id: str) -> str:
        """Hash: holder, token, since, for admins (the lease key itself expires)."""
        return f"{self._m(manager_id)}:mgr:{manager_id}:lease_info"

    def checker_stats(self, manager_id: str) -> str:
        """Hash: cycles run per token, last cycle duration (written under the fence)."""
        return f"{self._m(manager_id)}:mgr:{manager_id}:checker_stats"

    def pool(self, manager_id: str) -> str:
        """List: ready pooled node ids waiting to be claimed."""
        return f"{self._m(manager_id)}:mgr:{manager_id}:pool"

    def arrivals(self, manager_id: str) -> str:
        """Counter: creation requests of a manager_id so far (the pool's demand: nodeops/demand.py)."""
        return f"{self._m(manager_id)}:mgr:{manager_id}:arrivals"

    def creation_slots(self, manager_id: str) -> str:
        """Sorted set: creation slots held on the manager_id's engine (clients' and refills'),
        scored by when their lease ends (Redis time, ms): a killed process's slots lapse."""
        return f"{self._m(manager_id)}:mgr:{manager_id}:creating"

    def creation_refills(self, manager_id: str) -> str:
        """Sorted set: of creation_slots, those a pool refill holds (same scores)."""
        return f"{self._m(manager_id)}:mgr:{manager_id}:creating_refills"

    def creation_queue(self, manager_id: str) -> str:
        """Sorted set: client creations waiting for a slot, scored by their turn (round-robin by client)."""
        return f"{self._m(manager_id)}:mgr:{manager_id}:create_queue"

    def creation_waiters(self, manager_id: str) -> str:
        """Sorted set: the same waiters scored by when their lease ends (a process that died frees its place)."""
        return f"{self._m(manager_id)}:mgr:{manager_id}:create_waiters"

    def creation_turns(self, manager_id: str) -> str:
        """Hash: client -> the turn of its last queued creation (the round-robin), while any waits."""
        return f"{self._m(manager_id)}:mgr:{manager_id}:create_turns"

    def creation_round(self, manager_id: str) -> str:
        """Hash: the turn being served ('round') and the queue's arrival counter ('seq'), while any waits."""
        return f"{self._m(manager_id)}:mgr:{manager_id}:create_round"

    def intents(self, manager_id: str) -> str:
        """Hash: node id -> a lifecycle call (stop, release) accepted while no replica of the owner
        was reachable, for the owner's checker to carry out."""
        return f"{self._m(manager_id)}:mgr:{manager_id}:intents"

    def manager_seen(self) -> str:
        """Sorted set: manager_id scored by the last heartbeat of any of its replicas."""
        return f"{self._t('reg')}:manager_seen"

    def draining(self) -> str:
        """Set: manager_ids that take no new sessions."""
        return f"{self._t('reg')}:draining"

    def managers(self) -> str:
        """Set: every manager_id ever seen (to enumerate indexes)."""
        return f"{self._t('reg')}:managers"

    def replica(self, replica_id: str) -> str:
        """Hash with a TTL renewed by the replica's heartbeat."""
        return f"{self._t('reg')}:replica:{replica_id}"

    def replicas(self) -> str:
        """Sorted set: replica ids scored by last heartbeat (pruned of expired members)."""
        return f"{self._t('reg')}:replicas"

    def client_count(self, client: str = "") -> str:
        """Hash: client identity -> live node count (on a cluster, one hash per client, in its own slot)."""
        return f"{self._t('cl:' + client)}:client_count" if self.cluster else f"{self.prefix}:client_count"

    def client_version(self, client: str = "") -> str:
        """Hash: client identity -> writes of its count so far (beside it: the recount corrects a count
        only when nothing wrote it between its readings, checker/upkeep.py)."""
        return f"{self._t('cl:' + client)}:client_count_v" if self.cluster else f"{self.prefix}:client_count_v"

    def client_count_pattern(self) -> str:
        """A SCAN pattern of every client's count key on a cluster (the prefix's glob characters escaped)."""
        return re.sub(r"([*?\[\]\\])", r"\\\1", self.prefix) + ":{cl:*}:client_count"

    def upkeep_turn(self) -> str:
        """String 'replica_id' with a TTL: the replica doing the cluster-wide upkeep this period."""
        return f"{self._t('reg')}:upkeep_turn"

    def events(self) -> str:
        """Stream of every node lifecycle event, cluster-wide (replayable by id): what admin and
        console views of the whole cluster read, and the one stream replicas before the split read."""
        return f"{self._t('ev')}:events"

    def manager_events(self, manager_id: str) -> str:
        """Stream of the events of one manager_id's sessions: what its replicas (and any replica
        caching one of its sessions, or watching one) read."""
        return f"{self._m(manager_id)}:mgr:{manager_id}:events"

    def manager_events_removed(self, manager_id: str) -> str:
        """String: the last id of a manager_id's events stream the upkeep removed (it was gone), so a
        resume from before it is told its events are gone."""
        return f"{self._m(manager_id)}:mgr:{manager_id}:events_removed"

    def broadcast_events(self) -> str:
        """Stream of the rare events of no manager_id (an egress secret set), which every replica reads."""
        return f"{self._t('ev')}:events:broadcast"

    def event_readers(self) -> str:
        """Sorted set: replica ids that read the split streams, scored by their last heartbeat (a
        replica in replicas() but not here reads only events(): new replicas then read it too)."""
        return f"{self._t('reg')}:event_readers"

    def session_lock(self, session_id: str) -> str:
        """String 'holder' with a TTL: who is bringing a session's container back."""
        return f"{self._n(session_id)}:lock:{session_id}"

    def watchers(self, node_id: str) -> str:
        """String 'alive'/'close': liveness of a session's event watchers, as XAgent's MainServer."""
        return f"{self._n(node_id)}:watch:{node_id}"

    def mcp_session(self, token_hash: str) -> str:
        """Hash: one MCP session (Mcp-Session-Id or 2026 handle, by its hash): node, owner, version."""
        return f"{self._t(token_hash)}:mcp:session:{token_hash}"

    def mcp_stream(self, token_hash: str, stream_id: str) -> str:
        """Stream: the SSE events of one MCP response stream, replayable by Last-Event-ID."""
        return f"{self._t(token_hash)}:mcp:stream:{token_hash}:{stream_id}"

    def mcp_stream_owner(self, token_hash: str, stream_id: str) -> str:
        """String replica_id with a short TTL, renewed while the stream's call runs."""
        return f"{self._t(token_hash)}:mcp:stream_owner:{token_hash}:{stream_id}"

    def mcp_cancel(self, token_hash: str, request_id: str) -> str:
        """String with a TTL: the client cancelled this request of this session (2025-11-25)."""
        return f"{self._t(token_hash)}:mcp:cancel:{token_hash}:{request_id}"

    def console_revoked(self, login_id: str) -> str:
        """String with a TTL: a console login ended by logout (until the cookie would expire)."""
        return f"{self.prefix}:console:revoked:{login_id}"

    def mcp_tools(self, image: str) -> str:
        """String: the MCP tool list last read from a node of this image (JSON)."""
        return f"{self.prefix}:mcp:tools:{image}"

    @staticmethod
    def snapshot_member(client: str, name: str) -> str:
        """A snapshot's name in its client's scope: names are per client (two clients may each
        keep "base"); the client identity is hashed, as it may hold any character."""
        return f"{hashlib.sha256(client.encode()).hexdigest()[:24]}:{name}"

    def snapshot(self, member: str) -> str:
        """Hash: one snapshot's metadata, by its snapshot_member (its bytes are on its manager_id's host)."""
        return f"{self._t('snaps')}:snap:{member}"

    def snapshots(self) -> str:
        """Set: every snapshot's snapshot_member."""
        return f"{self._t('snaps')}:snaps"

    def snapshot_bytes(self) -> str:
        """Hash: manager_id -> bytes its snapshots take on its host (bounded by fork.snapshot_bytes)."""
        return f"{self._t('snaps')}:snaps:bytes"

    def snapshot_count(self) -> str:
        """Hash: client identity -> snapshots it keeps (bounded by fork.snapshots_per_client)."""
        return f"{self._t('snaps')}:snaps:per_client"

    def egress_learned(self, manager_id: str) -> str:
        """Hash: "<node address> <destination> <name>" -> until when (epoch seconds) that answer
        opened it: what the egress agent learned, so a standby that takes it over knows it."""
        return f"{self._m(manager_id)}:mgr:{manager_id}:egress_learned"

    def egress_secrets(self) -> str:
        """Hash: secret name -> its hosts and its value encrypted (shared/egress/secrets.py), JSON."""
        return f"{self.prefix}:egress:secrets"


# A creation slot held in a manager's node set until the node's own id replaces it.
RESERVATION_PREFIX = "pending:"


def reservation_member(at: float, nonce: str, replica_id: str = "", client: str = "") -> str:
    """A reservation naming who took it and for which client (hex: a client id may hold ':'), so
    the checker that drops it when its replica died gives the client's count back."""
    tail = f":{replica_id}" if replica_id or client else ""
    return f"{RESERVATION_PREFIX}{at:.3f}:{nonce}" + tail + (f":{client.encode().hex()}" if client else "")


def reservation_replica(member: str) -> str:
    """The replica that took a reservation ("" when it does not say)."""
    parts = member[len(RESERVATION_PREFIX):].split(":", 3) if is_reservation(member) else []
    return parts[2] if len(parts) >= 3 else ""


def reservation_client(member: str) -> str:
    """The client a reservation was counted for ("" when none, or a reservation made before it said)."""
    parts = member[len(RESERVATION_PREFIX):].split(":", 3) if is_reservation(member) else []
    try:
        return bytes.fromhex(parts[3]).decode() if len(parts) == 4 else ""
    except ValueError:
        return ""


def is_reservation(member: str) -> bool:
    return member.startswith(RESERVATION_PREFIX)


def reservation_time(member: str) -> float:
    """When a reservation was taken (0 when the member is not one)."""
    try:
        return float(member[len(RESERVATION_PREFIX):].split(":")[0]) if is_reservation(member) else 0.0
    except ValueError:
        return 0.0
