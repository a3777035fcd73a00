"""The host agent of egress policies (egress.enforce): on each host, for its manager_id's bridge.

It installs the bridge's nftables table (shared/egress/nft.py), serves the egress resolver on the
bridge's address (shared/egress/dns.py), and keeps the per-node sets equal to the policies of the
sessions running there. It follows the event stream: a policy change (or a node started, resumed,
restarted) makes it sync at once, so a change made on any replica of any host is in force on the
node's host within the time of one stream read and one nft transaction; a sync also runs every
``SYNC_SECONDS`` to catch anything missed while Redis was away.

Several replicas of one manager_id on one host share the bridge: the one whose resolver holds
the address acts, the others retry the bind and stand by (they take over when it goes).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nodeops import egress
from nodeops.context import NodeOps
from shared import firewall, metrics, netns
from shared.egress import nft
from shared.egress.conntrack import Conntrack
from shared.egress.dns import EgressResolver, upstreams_from
from shared.egress.policy import PLATFORM_DENY, EgressPolicy, Network, name_allowed, networks
from shared.egress.proxy import EgressProxy
from shared.egress.secrets import CertMint, Secret, SecretBox
from shared.egress.tlsqueue import MARK_NO, MARK_OK, MARK_QUEUE, TlsQueue, queue_number
from shared.errors import ManagerError
from shared.models import Event, EventKind

log = logging.getLogger(__name__)

SYNC_SECONDS = 2.0
IN_FORCE_WAIT_SECONDS = 10.0  # how long a new session's hand-out waits for its policy in the firewall
UNKNOWN_WAIT_SECONDS = 2.0  # how long a query from an address not known yet waits for a sync to find it
# events after which a node may have a new address or policy
_SYNC_ON = {EventKind.EGRESS_POLICY, EventKind.READY, EventKind.CREATED, EventKind.RESTARTED,
            EventKind.RESUMED, EventKind.ADOPTED, EventKind.RELEASED, EventKind.REMOVED}


class EgressAgent:
    def __init__(self, ops: NodeOps) -> None:
        self.ops = ops
        self.cfg = ops.cfg.egress
        self.bridge = ""
        self.by_ip: dict[str, EgressPolicy] = {}
        self.session_of: dict[str, str] = {}  # node address -> session id
        # node address -> destination -> {name it resolved for: until (monotonic)}
        self.learned: dict[str, dict[str, dict[str, float]]] = {}
        self.proxy: EgressProxy | None = None
        # 443 of sessions whose TLS is not terminated: the SNI checked in the kernel's queue, the
        # bytes then forwarded by the kernel (None: not bound; that 443 goes to the proxy instead)
        self.tlsq: TlsQueue | None = None
        self.conntrack: Conntrack | None = None
        self.mint: CertMint | None = None
        self.applied_tls: bool | None = None
        self.queue_rule = False  # the iptables rule that feeds the queue is in place
        self.blocked: list[Network] = []  # never opened, whatever resolves to them
        self.applied: dict[str, EgressPolicy] | None = None
        self.resolver: EgressResolver | None = None
        self.poke = asyncio.Event()
        self.changed: set[str] = set()  # sessions whose policy changed: one record read, no engine call
        self.full = True  # a node may have come or gone: the engine is asked
        self.changed_at: list[float] = []  # when the changes waiting to be applied were made (wall clock)
        self.audit_window: dict[str, tuple[float, int]] = {}  # session -> (window start, refusals in it)
        self.pending: set[asyncio.Task[None]] = set()
        self.secrets: dict[str, Secret] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.last_sync = 0.0  # monotonic time of the last sync that changed the sets

    def on_event(self, ev: Event) -> None:
        """From the event reader: sync now when it concerns this manager_id's nodes."""
        if ev.type == EventKind.EGRESS_SECRET and ev.detail.startswith("set "):
            self.full = True  # a full sync reads the secrets again
            self.poke.set()
            return
        if ev.manager_id == self.ops.manager_id and ev.type in _SYNC_ON:
            if ev.type == EventKind.EGRESS_POLICY:
                self.changed.add(ev.node_id)
                self.changed_at.append(ev.at)
            else:
                self.full = True
            self.poke.set()

    async def in_force(self, session_id: str, timeout: float = IN_FORCE_WAIT_SECONDS) -> bool | None:
        """Wait until the session's policy as recorded now is in this host's firewall, so it is handed
        out only then: its first call raced the sync that READY brings (a connection refused, full run
        f1). False when the time ran out; None at once where this replica's agent stands by (another
        holds the bridge and applies it as before) or the session has no record."""
        if self.resolver is None:
            return None
        recs = await self.ops.store.get_nodes([session_id])
        if not recs:
            return None
        want = egress.of_record(self.ops, recs[0])

        def applied() -> bool:
            done = self.applied or {}
            return any(sid == session_id and done.get(ip) == want for ip, sid in self.session_of.items())

        return await self._synced_until(applied, timeout)

    async def _synced_until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Ask for a full sync (the engine is listed: a node may be new to this host) and wait until done()
        holds; False if it still does not after timeout seconds."""
        self.full = True
        self.poke.set()
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    # --- resolver callbacks ---------------------------------------------------------------
    def policy_of(self, ip: str) -> EgressPolicy | None:
        return self.by_ip.get(ip)

    async def policy_when_known(self, ip: str) -> EgressPolicy | None:
        """The policy of an address not known yet, after a full sync now (None if it is still no node
        of this host): a session created through another replica asked before this one's sync saw it,
        and got REFUSED for its first names (seen in a full run)."""
        await self._synced_until(lambda: ip in self.by_ip, UNKNOWN_WAIT_SECONDS)
        return self.by_ip.get(ip)

    async def learn(self, ip: str, name: str, addrs: list[tuple[str, int]]) -> None:
        # a name may resolve to the host, metadata or a private address (DNS rebinding): never opened
        addrs = [(a, ttl) for a, ttl in addrs if not self._blocked(a)]
        if not addrs:
            return
        await self._nft(nft.learn_script(self.bridge, ip, addrs))
        seen = self.learned.setdefault(ip, {})
        now = time.monotonic()
        for a, ttl in addrs:
            seen.setdefault(a, {})[name] = now + ttl
        # kept for a standby that takes over (not awaited: the answer does not wait on Redis)
        wall = time.time()
        self._spawn(self.ops.store.egress_learned.add(self.ops.manager_id, ip,
                                                      [(a, name, wall + ttl) for a, ttl in addrs]))

    def _spawn(self, work: Any) -> None:
        task = asyncio.create_task(self._quietly(work))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    @staticmethod
    async def _quietly(work: Any) -> None:
        try:
            await work
        except ManagerError as exc:  # Redis away: a takeover then knows less, enforcement goes on
            log.warning("egress_learned_not_kept error=%r", exc.detail)

    async def _recall(self) -> None:
        """What the replica that held the resolver before learned: names behind open connections
        and addresses still open by an answer's TTL (in the kernel's sets already)."""
        try:
            kept = await self.ops.store.egress_learned.all(self.ops.manager_id)
        except ManagerError as exc:
            log.warning("egress_learned_not_read error=%r", exc.detail)
            return
        mono, wall = time.monotonic(), time.time()
        for node, dst, name, until in kept:
            self.learned.setdefault(node, {}).setdefault(dst, {})[name] = mono + (until - wall)
        log.info("egress_learned_recalled entries=%d", len(kept))

    def _blocked(self, addr: str) -> bool:
        ip = ipaddress.ip_address(addr)
        return any(ip in n for n in self.blocked)

    def check(self, node: str, dst: str, name: str) -> tuple[bool, str]:
        """For the proxy: may this node open this address asking for this name?"""
        pol = self.by_ip.get(node)
        if pol is None:
            return False, "unknown node"
        if self._blocked(dst):
            return False, "platform deny set"
        ip = ipaddress.ip_address(dst)
        for field, verdict in (("deny", False), ("allow", True)):
            for net in networks(pol, field):
                if ip in net:
                    return verdict, str(net)
        if not name:
            return False, "no SNI or Host"
        allowed, rule = name_allowed(pol, name)
        if not allowed:
            return False, rule or f"default {pol.default}"
        if self.learned.get(node, {}).get(dst, {}).get(name, 0.0) > time.monotonic():
            return True, rule
        return False, f"{name} did not resolve to {dst} for this node"

    def still_allowed(self, node: str, dst: str, name: str) -> bool:
        """For connections the proxy let on: does the policy in force still allow them? (The
        answer that opened one may have expired since: an open connection outlives its TTL.)"""
        pol = self.by_ip.get(node)
        if pol is None or self._blocked(dst):
            return False
        ip = ipaddress.ip_address(dst)
        if any(ip in net for net in networks(pol, "deny")):
            return False
        if any(ip in net for net in networks(pol, "allow")):
            return True
        return bool(name) and name_allowed(pol, name)[0]

    def secrets_for(self, host: str) -> dict[str, Secret] | None:
        """Every secret, while there is one (None: none, TLS is spliced untouched). TLS to any host
        is then terminated: a placeholder sent to a host it is not bound to must be seen to be
        recorded; it goes on unreplaced."""
        return self.secrets or None

    def secret_use_from_thread(self, node: str, host: str, used: list[str], unbound: list[str]) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.secret_use, node, host, used, unbound)

    def secret_use(self, node: str, host: str, used: list[str], unbound: list[str]) -> None:
        for name in used:
            metrics.EGRESS_SECRETS.labels("used").inc()
            self.audit(node, f"secret=used name={name} host={host}", EventKind.EGRESS_SECRET)
        for name in unbound:
            metrics.EGRESS_SECRETS.labels("unbound").inc()
            self.audit(node, f"secret=unbound name={name} host={host}", EventKind.EGRESS_SECRET)

    async def load_secrets(self) -> None:
        key = self.ops.cfg.egress_secrets_key
        if not key:
            return
        box = SecretBox(key, self.ops.cfg.egress_secrets_old_keys)
        out: dict[str, Secret] = {}
        for name, stored in (await self.ops.store.egress_secrets.all()).items():
            try:
                out[name] = Secret(name=name, value=box.open(name, stored.sealed), hosts=tuple(stored.hosts),
                                   body=stored.body)
            except Exception:  # sealed under another key: never used, and never shown
                log.warning("egress_secret_unreadable name=%s", name)
        self.secrets = out

    def queue_refused(self, node: str, dst: str, port: int, name: str, why: str) -> None:
        """From the queue's thread: a refusal audited as the proxy's are."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._queue_refused, node, dst, port, name, why)

    def _queue_refused(self, node: str, dst: str, port: int, name: str, why: str) -> None:
        metrics.EGRESS_REFUSED.labels("tls").inc()
        self.audit(node, f"where=tls dst={dst}:{port} name={name or '-'} rule={why!r}")

    def proxy_refused(self, node: str, dst: str, port: int, name: str, why: str) -> None:
        metrics.EGRESS_REFUSED.labels("proxy").inc()
        self.audit(node, f"where=proxy dst={dst}:{port} name={name or '-'} rule={why!r}")

    def refused(self, ip: str, name: str, rule: str) -> None:
        metrics.EGRESS_REFUSED.labels("dns").inc()
        self.audit(ip, f"where=dns name={name} rule={rule!r}")

    def resolved(self) -> None:
        metrics.EGRESS_RESOLVED.inc()

    def audit(self, ip: str, detail: str, kind: str = EventKind.EGRESS_REFUSED) -> None:
        """A refusal as a log line and, within the session's allowance a minute, an event."""
        session = self.session_of.get(ip, "")
        log.info("egress_audit kind=%s node=%s session=%s %s", kind, ip, session[:12], detail)
        if not session:
            return
        now = time.monotonic()
        start, count = self.audit_window.get(session, (now, 0))
        if now - start >= 60.0:
            start, count = now, 0
        self.audit_window[session] = (start, count + 1)
        if count >= self.cfg.audit_events_per_minute:
            metrics.EGRESS_EVENTS_DROPPED.inc()
            return
        ev = Event(type=kind, node_id=session, manager_id=self.ops.manager_id,
                   replica_id=self.ops.replica.replica_id, detail=detail)
        task = asyncio.create_task(self._publish(ev))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _publish(self, ev: Event) -> None:
        try:
            await self.ops.store.publish(ev)
        except ManagerError as exc:  # Redis away: the log line and the metric still have it
            log.warning("egress_audit_event_lost error=%r", exc.detail)

    # --- the loop -------------------------------------------------------------------------
    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        while True:
            try:
                await self._setup()
                break
            except asyncio.CancelledError:
                raise
            except (ManagerError, nft.NftError, firewall.NoPrivilege, firewall.FirewallError, OSError) as exc:
                log.warning("egress_agent_setup_failed error=%r", getattr(exc, "detail", str(exc)))
                await asyncio.sleep(SYNC_SECONDS)
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.poke.wait(), SYNC_SECONDS)
                self.poke.clear()
                if self.tlsq is not None:
                    self.tlsq.sweep()
                if self.resolver is None:
                    await self._bind()
                if self.resolver is None:
                    continue
                try:
                    changed, self.changed = self.changed, set()
                    made, self.changed_at = self.changed_at, []
                    if self.full or not changed or not await self.apply_changed(changed):
                        self.full = False
                        await self.sync()
                    for at in made:
                        metrics.EGRESS_APPLY_SECONDS.observe(max(0.0, time.time() - at))
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("egress_sync_failed error=%r", getattr(exc, "detail", str(exc)))
        finally:
            if self.resolver is not None:
                self.resolver.close()
            if self.proxy is not None:
                self.proxy.close()
            if self.tlsq is not None:
                self.tlsq.close()
            if self.conntrack is not None:
                self.conntrack.close()

    async def _setup(self) -> None:
        found = await self.ops.backend.egress_bridge(self.ops.manager_id)
        if found is None:
            raise ManagerError("egress.enforce needs node.network.isolated (a node bridge)")
        self.bridge, self.gateway, prefix = found
        net = ipaddress.ip_network(f"{self.gateway}/{prefix}", strict=False)
        platform: list[Network] = [ipaddress.ip_network(p) for p in PLATFORM_DENY]
        # the host's addresses, and the manager's own where it has a namespace of its own (a pod)
        pid = await self.ops.backend.engine_netns(self.ops.manager_id)
        mine = await asyncio.to_thread(nft.host_ipv4s)
        theirs = await asyncio.to_thread(nft.host_ipv4s, pid) if pid is not None else []
        platform += [net] + [ipaddress.ip_network(f"{a}/32") for a in sorted(set(mine + theirs))]
        opened = [ipaddress.ip_network(c, strict=False) for c in self.ops.cfg.node.network.allow_cidrs]
        private = [ipaddress.ip_network(c) for c in firewall.BLOCKED]
        self.blocked = platform + [p for p in private if not any(p.subnet_of(o) for o in opened  # type: ignore[arg-type]
                                                                 if o.version == p.version)]
        await self._nft(nft.table_script(self.bridge, platform, self.gateway, self.cfg.dns_port, self.cfg.proxy_port))
        ipt = (await asyncio.to_thread(firewall.Iptables.of_engine, self.bridge)
               if self.ops.cfg.node.network.firewall_host_namespace else firewall.HERE)
        if self.ops.cfg.node.network.firewall:  # the project's chains refuse the host to nodes: open the resolver
            await asyncio.to_thread(firewall.sync_dns, self.bridge, self.gateway, self.cfg.dns_port, ipt,
                                    self.cfg.proxy_port)
        # every replica names the same queue (by the bridge), so whichever holds the resolver reads it
        number = queue_number(self.bridge) if (self.cfg.tls_queue and self.cfg.proxy_port) else None
        try:
            await asyncio.to_thread(firewall.sync_queue, self.bridge, number, MARK_QUEUE, ipt)
            self.queue_rule = number is not None
        except (firewall.NoPrivilege, firewall.FirewallError) as exc:  # no NFQUEUE target: 443 via the proxy
            log.warning("egress_tlsqueue_rule_failed error=%r", getattr(exc, "detail", str(exc)))
            self.queue_rule = False
        await self._bind()

    async def _nft(self, script: str) -> None:
        """One nft transaction, in the namespace of the node bridge (the engine's, from a pod)."""
        await asyncio.to_thread(nft.run, script, await self.ops.backend.engine_netns(self.ops.manager_id))

    async def _bind(self) -> None:
        res = EgressResolver(policy_of=self.policy_of, learn=self.learn, refused=self.refused, resolved=self.resolved,
                             unknown=self.policy_when_known,
                             upstream=upstreams_from(self.cfg.upstream_dns), min_ttl=self.cfg.min_ttl_seconds,
                             max_ttl=self.cfg.max_ttl_seconds)
        try:
            await res.start(self.gateway, self.cfg.dns_port, await self.ops.backend.engine_netns(self.ops.manager_id))
        except OSError as exc:
            log.info("egress_resolver_standby address=%s:%d reason=%r", self.gateway, self.cfg.dns_port, str(exc))
            return
        self.resolver = res
        await self._recall()
        if self.cfg.proxy_port:
            mint = None
            if self.cfg.ca_cert_file and self.cfg.ca_key_file:
                mint = CertMint(Path(self.cfg.ca_cert_file).read_bytes(), Path(self.cfg.ca_key_file).read_bytes())
            self.mint = mint
            if self.queue_rule:
                await self._bind_queue()
            upstream = ssl.create_default_context(cafile=self.cfg.upstream_ca_file or None)
            proxy = EgressProxy(self.check, self.proxy_refused, self.secrets_for, mint, upstream,
                                self.secret_use_from_thread)
            try:
                await proxy.start(self.gateway, self.cfg.proxy_port,
                                  await self.ops.backend.engine_netns(self.ops.manager_id))
                self.proxy = proxy
            except OSError as exc:  # the redirected connections are then refused (nothing listens)
                log.warning("egress_proxy_not_serving address=%s:%d reason=%r", self.gateway, self.cfg.proxy_port,
                            str(exc))
        self.applied = None
        log.info("egress_resolver_serving address=%s:%d bridge=%s", self.gateway, self.cfg.dns_port, self.bridge)
        await self.sync()

    async def _bind_queue(self) -> None:
        """Read the bridge's queue (its socket and the conntrack one made in the bridge's namespace);
        if it cannot be bound, 443 goes through the proxy as before."""
        pid = await self.ops.backend.engine_netns(self.ops.manager_id)
        number = queue_number(self.bridge)
        tlsq = TlsQueue(self.check, self.queue_refused)
        try:
            await asyncio.to_thread(netns.made_in, pid, lambda: tlsq.open_queue(number))
            self.conntrack = await asyncio.to_thread(netns.made_in, pid, Conntrack)
        except (OSError, ImportError) as exc:
            tlsq.close()
            log.warning("egress_tlsqueue_not_bound queue=%d reason=%r (443 goes through the proxy)", number, str(exc))
            return
        tlsq.start()
        self.tlsq = tlsq
        log.info("egress_tlsqueue_bound queue=%d bridge=%s", number, self.bridge)

    def _tls_proxy(self) -> bool:
        """Whether deny-by-default sessions' 443 goes to the proxy: it terminates TLS while secrets
        exist (a placeholder must be seen to be replaced or recorded), or no queue is read."""
        return self.tlsq is None or (bool(self.secrets) and self.mint is not None)

    async def apply_changed(self, sessions: set[str]) -> bool:
        """Apply new policies of running sessions this host knows; False: one is not known here
        (a full sync is needed)."""
        ip_of = {sid: ip for ip, sid in self.session_of.items()}
        if not all(sid in ip_of for sid in sessions):
            return False
        recs = await self.ops.store.get_nodes(sorted(sessions))
        by_ip = dict(self.by_ip)
        for rec in recs:
            by_ip[ip_of[rec.id]] = egress.of_record(self.ops, rec)
        await self._apply(by_ip)
        return True

    async def _apply(self, by_ip: dict[str, EgressPolicy]) -> None:
        tls_proxy = self._tls_proxy()
        if by_ip == self.applied and tls_proxy == self.applied_tls:
            self.by_ip = by_ip
            return
        # learned addresses whose name the new policy no longer allows close now, not at their TTL
        stale = [(ip, a) for ip, seen in self.learned.items() for a, names in seen.items()
                 if ip not in by_ip or not any(name_allowed(by_ip[ip], n)[0] for n in names)]
        script = nft.nodes_script(self.bridge, by_ip, tls_proxy) + nft.forget_script(self.bridge, stale)
        await self._nft(script)
        self.applied_tls = tls_proxy
        gone = [(ip, a, n) for ip, a in stale for n in self.learned.get(ip, {}).pop(a, {})]
        if gone:
            self._spawn(self.ops.store.egress_learned.forget(self.ops.manager_id, gone))
        # the resolver answers by the new policy only once the firewall has it too
        self.by_ip, self.applied = by_ip, by_ip
        # connections through the proxy are the host's own: the firewall does not see them again
        cut = self.proxy.cut(self.still_allowed) if self.proxy is not None else 0
        # connections the kernel forwards after the queue's check: marked refused, so the firewall
        # resets the node's next packet on one
        if self.tlsq is not None and self.conntrack is not None:
            cut += await asyncio.to_thread(self.conntrack.set_mark, self.tlsq.cut(self.still_allowed), MARK_NO,
                                           MARK_OK)
        self.last_sync = time.monotonic()
        log.info("egress_synced nodes=%d closed=%d cut=%d", len(by_ip), len(stale), cut)

    async def sync(self) -> None:
        """Make the host's sets equal to the running nodes' policies (one engine call, one Redis read)."""
        await self.load_secrets()
        infos = [i for i in await self.ops.backend.nodes(self.ops.manager_id) if i.ip]
        recs = {r.id: r for r in await self.ops.store.get_nodes([i.session for i in infos])}
        by_ip: dict[str, EgressPolicy] = {}
        session_of: dict[str, str] = {}
        for info in infos:
            rec = recs.get(info.session)
            by_ip[info.ip] = egress.of_record(self.ops, rec) if rec is not None else self.cfg.default
            session_of[info.ip] = info.session
        self.session_of = session_of
        await self._apply(by_ip)
        if self.tlsq is not None and self.conntrack is not None:  # forget the connections that ended
            asked = self.tlsq.tracked()
            self.tlsq.forget_ended(asked, await asyncio.to_thread(self.conntrack.alive, asked))
