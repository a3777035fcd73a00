"""The host firewall side of egress policies: one nftables table per node bridge.

Why nftables and not iptables + ipset: a set element carries its own timeout (an answer's TTL)
and the kernel drops it when it expires, so no sweeper of ours runs; concatenated keys
(``node address . destination``) hold every session of a bridge in one set, matched in one
lookup; and ``nft -f`` applies a whole change in one transaction, so a policy change is never
seen half done. The table is ours alone (``inet tsm_egress_<hash>``): installing or removing it
touches no other table, and Docker's and the project's iptables chains (shared/firewall.py) still
run as before: a packet must pass both, so this can only take egress away, never add to it.

  prerouting, from the bridge: a deny-by-default session's 80 to a learned address -> the
                             proxy (shared/egress/proxy.py), which checks Host against it; its
                             443 too when its TLS is terminated there (``tls_proxy``: secrets)
  tlsmark (forward, first):  else its 443: the SYN and the first packets with bytes are marked
                             for the agent's queue (shared/egress/tlsqueue.py), which checks the
                             ClientHello's SNI and marks the connection checked or refused; a
                             non-SYN packet of no known connection is reset
  input, from the bridge:    replies pass; the resolver's and the proxy's ports on the bridge
                             address; the rest refused
  forward, from the bridge:  the node's answers to connections made to it pass; the platform
                             set is refused; a session's denied ranges are refused; its learned
                             (resolved) addresses, its allowed ranges and "default: allow"
                             sessions pass; the rest is refused with a TCP reset or ICMP
                             admin-prohibited: a refusal seen at once. Connections the node
                             opened are checked at every packet, not only the first: a policy
                             narrowed while one is open resets it at the node's next packet
                             (``live`` keeps a learned pair past its TTL for the connections
                             already open to it, until a policy takes the name away)
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import shutil
import subprocess
from collections.abc import Iterable

from shared import netns
from shared.egress.policy import EgressPolicy, Network, networks
from shared.egress.tlsqueue import MARK_NO, MARK_OK, MARK_QUEUE
from shared.firewall import NoPrivilege

TABLE_PREFIX = "tsm_egress_"


class NftError(Exception):
    """nft refused a change (its message is the text)."""


def table_name(bridge: str) -> str:
    """The table of one node bridge (names of bridges may hold characters nft does not take)."""
    return TABLE_PREFIX + hashlib.sha256(bridge.encode()).hexdigest()[:10]


def run(script: str, pid: int | None = None) -> str:
    """Apply an nft script in one transaction (in another process's network namespace with pid)."""
    if pid is None:
        exe = shutil.which("nft")
        if exe is None:
            raise NoPrivilege("nft is not installed (apt-get install nftables)")
        argv = [exe, "-f", "-"]
    else:  # the engine host's own nft, in its namespaces
        if shutil.which("nsenter") is None:
            raise NoPrivilege("nsenter is not installed")
        argv = [*netns.nsenter(pid), "nft", "-f", "-"]
    try:
        res = subprocess.run(argv, input=script, capture_output=True, text=True, timeout=30)
    except PermissionError as exc:
        raise NoPrivilege(f"cannot run nft: {exc}") from exc
    if res.returncode != 0:
        err = (res.stderr or "").strip()
        if "Operation not permitted" in err or "failed to execute nft" in err:
            raise NoPrivilege(f"nft: {err.splitlines()[0]}")
        raise NftError(err[:2000])
    return res.stdout


def _elems(items: Iterable[str]) -> str:
    return ", ".join(items)


def table_script(bridge: str, platform: Iterable[Network], gateway: str, dns_port: int, proxy_port: int = 0) -> str:
    """The table with its sets and chains (learned addresses kept when it already exists)."""
    t = table_name(bridge)
    plat = [str(n) for n in platform if n.version == 4]
    lines = [
        f"add table inet {t}",
        f"add set inet {t} platform {{ type ipv4_addr; flags interval; auto-merge; }}",
        # learned from the resolver: node . destination, each for its answer's TTL
        f"add set inet {t} learned {{ type ipv4_addr . ipv4_addr; flags timeout; }}",
        # every learned pair not since taken away: connections opened while it was learned go on
        # past its TTL (a download outlives a 60 s record), new ones need a fresh answer
        f"add set inet {t} live {{ type ipv4_addr . ipv4_addr; }}",
        f"add set inet {t} allow_net {{ type ipv4_addr . ipv4_addr; flags interval; }}",
        f"add set inet {t} deny_net {{ type ipv4_addr . ipv4_addr; flags interval; }}",
        f"add set inet {t} open_nodes {{ type ipv4_addr; }}",
        # deny-by-default sessions whose 443 the proxy terminates (secrets); the others' is checked
        # in the agent's queue and then forwarded by the kernel
        f"add set inet {t} tls_proxy {{ type ipv4_addr; }}",
        # before the mangle table's queueing rule (priority -150, shared/firewall.py)
        f"add chain inet {t} tlsmark {{ type filter hook forward priority -200; policy accept; }}",
        f"flush chain inet {t} tlsmark",
        f"add chain inet {t} tlsq",
        f"flush chain inet {t} tlsq",
        f"add chain inet {t} forward {{ type filter hook forward priority -5; policy accept; }}",
        f"flush chain inet {t} forward",
        # the host itself: only the resolver's port on the bridge address (the project's iptables
        # chains say the same; this table holds on its own where those are not installed)
        f"add chain inet {t} input {{ type filter hook input priority -5; policy accept; }}",
        f"flush chain inet {t} input",
        # ahead of the engine's own (dstnat): 80 and 443 to a learned address go through the proxy
        f"add chain inet {t} prerouting {{ type nat hook prerouting priority dstnat - 1; policy accept; }}",
        f"flush chain inet {t} prerouting",
        f"flush set inet {t} platform",
    ]
    if plat:
        lines.append(f"add element inet {t} platform {{ {_elems(plat)} }}")
    br = f'iifname "{bridge}"'
    checked, q = MARK_OK | MARK_NO, f"meta mark set meta mark | {MARK_QUEUE:#x} return"
    # 443 of deny-by-default sessions to learned addresses, on connections not yet checked: the SYN
    # (where the stream starts) and every packet with bytes go to the queue; the handshake's ACK
    # and other empty packets pass. Bytes are told apart by the IP length against the TCP header's
    # (nft compares a field with a constant only: one rule a header length)
    if proxy_port:  # without the proxy no name is checked on 80 or 443
        lines.append(f"add rule inet {t} tlsmark {br} tcp dport 443 ct mark & {checked:#x} == 0 "
                     f"ip saddr != @open_nodes ip saddr . ip daddr @live jump tlsq")
    lines += [f"add rule inet {t} tlsq tcp flags & (syn | ack) == syn ip saddr . ip daddr @learned {q}",
              f"add rule inet {t} tlsq tcp flags & (syn | ack) == syn return",
              # mid-stream with no connection (its entry taken away by a narrowing): refused
              f"add rule inet {t} tlsq ct state new,invalid reject with tcp reset",
              f"add rule inet {t} tlsq ip hdrlength != 5 reject with tcp reset",
              *[f"add rule inet {t} tlsq tcp doff {d} ip length > {20 + 4 * d} {q}" for d in range(5, 16)]]
    refuse = [f"{br} meta l4proto tcp reject with tcp reset", f"{br} reject with icmpx type admin-prohibited"]
    # no blanket "established: accept" for what the node sends: a connection it opened is held
    # to the policy in force at each packet, so narrowing a policy cuts what is already open
    for rule in (f"{br} ct direction reply accept",  # the node answering a connection made to it
                 f"{br} ct state related accept",
                 # marked for the queue and not given back by it (no reader bound: --queue-bypass,
                 # or the queueing rule missing): refused, never let on unchecked
                 f"{br} meta mark & {MARK_QUEUE:#x} == {MARK_QUEUE:#x} meta l4proto tcp reject with tcp reset",
                 # the queue's verdicts, kept as the connection's mark
                 f"{br} meta mark & {MARK_OK:#x} == {MARK_OK:#x} ct mark set ct mark | {MARK_OK:#x} "
                 f"meta mark set meta mark & {0xFFFFFFFF & ~MARK_OK:#x}",
                 f"{br} meta mark & {MARK_NO:#x} == {MARK_NO:#x} ct mark set ct mark | {MARK_NO:#x}",
                 f"{br} ct mark & {MARK_NO:#x} == {MARK_NO:#x} meta l4proto tcp reject with tcp reset",
                 *[f"{br} ip daddr @platform {r.split(' ', 2)[2]}" for r in refuse],
                 *[f"{br} ip saddr . ip daddr @deny_net {r.split(' ', 2)[2]}" for r in refuse],
                 # the accepts in any order (every refusal is above): open sessions, the default
                 # and the bulk of traffic, are matched first
                 f"{br} ip saddr @open_nodes accept",
                 f"{br} ip saddr . ip daddr @learned accept",
                 f"{br} ct state established ip saddr . ip daddr @live accept",
                 f"{br} ip saddr . ip daddr @allow_net accept",
                 *refuse):
        lines.append(f"add rule inet {t} forward {rule}")
    proxy_in = [f"{br} ip daddr {gateway} tcp dport {proxy_port} accept"] if proxy_port else []
    for rule in (f"{br} ct state established,related accept",
                 f"{br} ip daddr {gateway} udp dport {dns_port} accept",
                 f"{br} ip daddr {gateway} tcp dport {dns_port} accept",
                 *proxy_in,
                 *refuse):
        lines.append(f"add rule inet {t} input {rule}")
    if proxy_port:
        # sessions whose default is allow reach any public address by any name: not redirected
        lines += [f"add rule inet {t} prerouting {br} ip saddr @open_nodes return",
                  f"add rule inet {t} prerouting {br} ip saddr . ip daddr @learned tcp dport 80 "
                  f"redirect to :{proxy_port}",
                  f"add rule inet {t} prerouting {br} ip saddr @tls_proxy ip saddr . ip daddr @learned "
                  f"tcp dport 443 redirect to :{proxy_port}"]
    return "\n".join(lines) + "\n"


def nodes_script(bridge: str, policies: dict[str, EgressPolicy], tls_proxy: bool = True) -> str:
    """Make the per-node sets exactly ``policies`` (node address -> its policy), in one transaction;
    ``tls_proxy``: deny-by-default sessions' 443 goes to the proxy (else to the agent's queue)."""
    t = table_name(bridge)
    lines = [f"flush set inet {t} allow_net", f"flush set inet {t} deny_net", f"flush set inet {t} open_nodes",
             f"flush set inet {t} tls_proxy"]
    allow, deny, open_, proxied = [], [], [], []
    for ip, pol in sorted(policies.items()):
        if ipaddress.ip_address(ip).version != 4:
            continue
        allow += [f"{ip} . {n}" for n in networks(pol, "allow") if n.version == 4]
        deny += [f"{ip} . {n}" for n in networks(pol, "deny") if n.version == 4]
        if pol.default == "allow":
            open_.append(ip)
        elif tls_proxy:
            proxied.append(ip)
    for name, items in (("allow_net", allow), ("deny_net", deny), ("open_nodes", open_), ("tls_proxy", proxied)):
        if items:
            lines.append(f"add element inet {t} {name} {{ {_elems(items)} }}")
    return "\n".join(lines) + "\n"


def learn_script(bridge: str, node_ip: str, addrs: Iterable[tuple[str, int]]) -> str:
    """Open resolved addresses to one node, each for its TTL (seconds); re-adding refreshes it."""
    t = table_name(bridge)
    items = [f"{node_ip} . {a} timeout {max(1, int(ttl))}s" for a, ttl in addrs]
    if not items:
        return ""
    # delete-then-add would race a connection; "add" keeps an existing element's timeout, so
    # the element is deleted and added in the one transaction to refresh it
    return (f"add element inet {t} learned {{ {_elems(items)} }}\n"
            f"delete element inet {t} learned {{ {_elems(i.split(' timeout')[0] for i in items)} }}\n"
            f"add element inet {t} learned {{ {_elems(items)} }}\n"
            f"add element inet {t} live {{ {_elems(i.split(' timeout')[0] for i in items)} }}\n")


def forget_script(bridge: str, pairs: Iterable[tuple[str, str]]) -> str:
    """Close learned (node, destination) pairs at once, and the connections open to them (a policy
    change took their name away)."""
    items = [f"{n} . {a}" for n, a in pairs]
    if not items:
        return ""
    t = table_name(bridge)
    # added first so the delete never fails on a pair that expired meanwhile
    return (f"add element inet {t} learned {{ {_elems(i + ' timeout 1s' for i in items)} }}\n"
            f"delete element inet {t} learned {{ {_elems(items)} }}\n"
            f"add element inet {t} live {{ {_elems(items)} }}\n"
            f"delete element inet {t} live {{ {_elems(items)} }}\n")


def remove_script(bridge: str) -> str:
    """Take the bridge's table away (and nothing else)."""
    t = table_name(bridge)
    return f"add table inet {t}\ndelete table inet {t}\n"


def prune(pid: int | None = None) -> int:
    """Remove the egress tables of bridges this host no longer has (their network was removed);
    how many went. A table names its bridge in its rules (iifname)."""
    gone = 0
    have = set(_interfaces(pid))
    for t in tables(pid):
        found = re.search(r'iifname "([^"]+)"', run(f"list table inet {t}\n", pid))
        if found and found.group(1) not in have:
            run(f"delete table inet {t}\n", pid)
            gone += 1
    return gone


def _interfaces(pid: int | None = None) -> list[str]:
    try:
        with open(f"/proc/{pid or 'self'}/net/dev") as f:
            return [line.split(":", 1)[0].strip() for line in f.readlines()[2:]]
    except OSError:
        return []


def tables(pid: int | None = None) -> list[str]:
    """The egress tables present (for clean-up checks)."""
    out = run("list tables\n", pid)
    return [w for line in out.splitlines() for w in line.split() if w.startswith(TABLE_PREFIX)]


def _addresses(dev: str | None = None, pid: int | None = None) -> list[tuple[str, int]]:
    argv = [*netns.nsenter(pid), "ip", "-j", "-4", "addr", "show", *(["dev", dev] if dev else [])]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if res.returncode != 0:
        return []
    out = []
    for link in json.loads(res.stdout or "[]"):
        for a in link.get("addr_info") or []:
            if a.get("family") == "inet":
                out.append((str(a["local"]), int(a["prefixlen"])))
    return out


def interface_ipv4(dev: str, pid: int | None = None) -> tuple[str, int] | None:
    """(address, prefix length) of an interface of this host, or of ``pid``'s network namespace
    (None: no such interface or no address)."""
    found = _addresses(dev, pid)
    return found[0] if found else None


def host_ipv4s(pid: int | None = None) -> list[str]:
    """Every IPv4 address of this host's interfaces (or ``pid``'s namespace's): the platform set holds each."""
    return [a for a, _ in _addresses(pid=pid)]
