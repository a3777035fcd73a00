"""The host firewall rules that keep nodes off the host and off private networks.

Docker's own rules (a bridge with inter-container traffic off) stop node-to-node traffic on
one bridge; they do not stop a node from opening a connection to the host itself (the
gateway address, or any other address of the host: that is INPUT, not FORWARD), nor to
private ranges and 169.254.0.0/16 beyond the host. These rules do, for every bridge whose
name starts with one of the node bridge prefixes (the backend names its bridges so):

  INPUT   -> TSM-DNS:      the egress resolver's port on an enforcing bridge's address accepted
  INPUT   -> TSM-INPUT:    replies pass; anything a node opens to the host is refused
  mangle FORWARD -> TSM-EGRESSQ: an enforcing bridge's packets its egress table marked for the
                           agent's queue go there (shared/egress/tlsqueue.py; NFQUEUE is an
                           xtables target where nft has no queue statement)
  FORWARD -> DOCKER-USER -> TSM-FORWARD:
                           replies pass; TSM-ALLOW (per-bridge exceptions) accepts;
                           node to node refused; private, link-local, loopback and
                           shared ranges refused; egress "none" bridges refused everything

The chains are ours: installing flushes and refills TSM-INPUT and TSM-FORWARD, adds the two
jumps if missing, makes a bridge's TSM-ALLOW rules exactly the ranges it is given now, and
drops those of bridges that no longer exist (a network removed, or a manager_id gone), so an
exception never outlives its network nor passes to a later network of the same name; nothing
else is touched, and ``remove`` takes away exactly that. ``python -m shared.firewall install|remove|show``.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import sys

from shared.errors import ConfigError

# the host interfaces of node networks are named <prefix><hash>, by egress mode: the engine names
# its bridges with these, the rules below match them; kept here so neither side imports the other
BRIDGE_PREFIXES = {"open": "tsmo", "none": "tsmn"}
INPUT_CHAIN = "TSM-INPUT"
FORWARD_CHAIN = "TSM-FORWARD"
ALLOW_CHAIN = "TSM-ALLOW"
# per-bridge openings of the egress resolver (shared/egress/): its port on the bridge's own
# address, for bridges whose manager enforces egress policies; empty otherwise. Jumped to from
# INPUT ahead of TSM-INPUT (a chain of its own, so TSM-INPUT's content is the same for every manager)
DNS_CHAIN = "TSM-DNS"
QUEUE_CHAIN = "TSM-EGRESSQ"  # in the mangle table: between the egress table's marking and its filter
# where nodes must never connect to (RFC 1918, link-local incl. cloud metadata, loopback,
# carrier-grade NAT, "this network", benchmarking, multicast)
BLOCKED = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "127.0.0.0/8",
           "100.64.0.0/10", "0.0.0.0/8", "198.18.0.0/15", "224.0.0.0/4")


class NoPrivilege(Exception):
    """iptables is missing or we may not run it: isolation rests on Docker's rules alone."""


class FirewallError(ConfigError):
    """The rules could not be installed for another reason (named in the message)."""


def _reject(match: list[str]) -> list[list[str]]:
    # refuse at once (a TCP reset, an ICMP error otherwise) rather than let the node wait
    return [[*match, "-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"],
            [*match, "-j", "REJECT", "--reject-with", "icmp-port-unreachable"]]


def rules(open_prefix: str, none_prefix: str) -> dict[str, list[list[str]]]:
    """The content of our two main chains, for the bridge name prefixes of each egress mode."""
    bridges = [f"{open_prefix}+", f"{none_prefix}+"]
    inp: list[list[str]] = []
    fwd: list[list[str]] = [["-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "RETURN"]]
    for b in bridges:
        inp.append(["-i", b, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "RETURN"])
        inp += _reject(["-i", b])
        fwd.append(["-i", b, "-j", ALLOW_CHAIN])
    for b in bridges:
        for other in bridges:
            fwd += _reject(["-i", b, "-o", other])
    for cidr in BLOCKED:
        fwd += _reject(["-d", cidr, "-i", bridges[0]])  # in the order iptables -S prints
    fwd += _reject(["-i", bridges[1]])
    return {INPUT_CHAIN: inp, FORWARD_CHAIN: fwd}


class Iptables:
    """Runs iptables here, or in the network and mount namespaces of another process.

    The other process is for a manager in a container that shares the host's PID namespace (the
    chart's pods with the host's engine): the rules must land in the engine's network namespace,
    where the node bridges are, and that namespace's own iptables binary puts them there.
    """

    def __init__(self, pid: int | None = None) -> None:
        self.pid = pid

    @classmethod
    def of_engine(cls, bridge: str) -> Iptables:
        """The namespaces of the dockerd process that has ``bridge`` (else PID 1's)."""
        for entry in sorted(os.listdir("/proc"), key=lambda e: (len(e), e)):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().strip() != "dockerd":
                        continue
            except OSError:
                continue
            found = cls(int(entry))
            if found.has_interface(bridge):
                return found
        return cls(1)

    def argv(self) -> list[str]:
        if self.pid is None:
            exe = shutil.which("iptables")
            if exe is None:
                raise NoPrivilege("iptables is not installed")
            return [exe]
        exe = shutil.which("nsenter")
        if exe is None:
            raise NoPrivilege("nsenter is not installed (node.network.firewall_host_namespace)")
        return [exe, "--target", str(self.pid), "--mount", "--net", "--", "iptables"]

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        try:
            res = subprocess.run([*self.argv(), "-w", "5", *args], capture_output=True, text=True, timeout=30)
        except PermissionError as exc:
            raise NoPrivilege(f"cannot run iptables: {exc}") from exc
        err = (res.stderr or "").strip()
        if res.returncode != 0 and any(w in err for w in (
                "Permission denied", "you must be root", "Operation not permitted",
                "nsenter: ", "No such file or directory")):
            raise NoPrivilege(f"iptables: {err.splitlines()[0] if err else 'permission denied'}")
        if check and res.returncode != 0:
            raise FirewallError(f"iptables {' '.join(args)} failed: {err}")
        return res

    def has_interface(self, name: str) -> bool:
        """Whether the network namespace the rules go to has this interface."""
        # /proc/<pid>/net/dev lists the interfaces of that process's network namespace
        try:
            with open(f"/proc/{self.pid or 'self'}/net/dev") as f:
                return any(line.split(":", 1)[0].strip() == name for line in f.readlines()[2:])
        except OSError:
            return True  # cannot tell: keep the rule


HERE = Iptables()
_engine_pids: dict[str, int] = {}


def engine_pid(bridge: str) -> int:
    """The pid of the dockerd whose network namespace has ``bridge`` (node.network.firewall_host_namespace:
    the egress agent's sockets and nft tables go there), remembered while that process lives."""
    pid = _engine_pids.get(bridge)
    try:
        with open(f"/proc/{pid}/comm") as f:
            alive = f.read().strip() == "dockerd"
    except (OSError, TypeError):
        alive = False
    if pid is not None and alive and Iptables(pid).has_interface(bridge):
        return pid
    pid = Iptables.of_engine(bridge).pid or 1
    _engine_pids[bridge] = pid
    return pid


def _ensure_chain(ipt: Iptables, name: str) -> None:
    if ipt("-n", "-L", name, check=False).returncode != 0:
        ipt("-N", name)


def _ensure_jump(ipt: Iptables, parent: str, chain: str) -> None:
    if ipt("-C", parent, "-j", chain, check=False).returncode != 0:
        ipt("-I", parent, "1", "-j", chain)


def install(open_prefix: str, none_prefix: str, allow: dict[str, list[str]] | None = None,
            ipt: Iptables = HERE) -> None:
    """Install (idempotently) the chains and jumps; ``allow`` maps a bridge to ranges it may reach."""
    want = rules(open_prefix, none_prefix)
    for chain in (ALLOW_CHAIN, DNS_CHAIN, INPUT_CHAIN, FORWARD_CHAIN):
        _ensure_chain(ipt, chain)
    for chain, body in want.items():
        have = [line for line in ipt("-S", chain).stdout.splitlines() if line.startswith("-A ")]
        if have != [_render(chain, r) for r in body]:
            ipt("-F", chain)
            for r in body:
                ipt("-A", chain, *r)
    for bridge, cidrs in (allow or {}).items():
        sync_allow(bridge, cidrs, ipt)
    prune_allow(ipt)
    _ensure_jump(ipt, "INPUT", INPUT_CHAIN)
    # before TSM-INPUT, which refuses everything a node opens to the host: TSM-DNS accepts only
    # the resolver's port on the bridge address of a manager that enforces egress policies
    _ensure_jump(ipt, "INPUT", DNS_CHAIN)
    # Docker puts DOCKER-USER before its own accepts; an engine without iptables has none
    parent = "DOCKER-USER" if ipt("-n", "-L", "DOCKER-USER", check=False).returncode == 0 else "FORWARD"
    _ensure_jump(ipt, parent, FORWARD_CHAIN)


def _allow_rules(ipt: Iptables) -> list[tuple[str, str]]:
    """(bridge, range) of each TSM-ALLOW rule, as ``iptables -S`` prints them."""
    found = []
    for line in ipt("-S", ALLOW_CHAIN, check=False).stdout.splitlines():
        words = line.split()
        if words[:2] == ["-A", ALLOW_CHAIN] and "-i" in words and "-d" in words:
            found.append((words[words.index("-i") + 1], words[words.index("-d") + 1]))
    return found


def _allow_rule(bridge: str, cidr: str) -> list[str]:
    return ["-i", bridge, "-d", cidr, "-j", "ACCEPT"]


def sync_allow(bridge: str, cidrs: list[str], ipt: Iptables = HERE) -> None:
    """Make ``bridge``'s exceptions exactly ``cidrs`` (an empty list takes them all away)."""
    # iptables prints a range with its mask and host bits cleared: compare in that form
    want = {str(ipaddress.ip_network(c, strict=False)) for c in cidrs}
    have = {cidr for b, cidr in _allow_rules(ipt) if b == bridge}
    for cidr in sorted(have - want):
        ipt("-D", ALLOW_CHAIN, *_allow_rule(bridge, cidr), check=False)
    for cidr in sorted(want - have):
        ipt("-A", ALLOW_CHAIN, *_allow_rule(bridge, cidr))


def prune_allow(ipt: Iptables = HERE) -> int:
    """Drop the exceptions (and resolver openings) of bridges this host no longer has; how many went."""
    gone = 0
    for bridge, cidr in _allow_rules(ipt):
        if not ipt.has_interface(bridge):
            gone += ipt("-D", ALLOW_CHAIN, *_allow_rule(bridge, cidr), check=False).returncode == 0
    for bridge, rule in _dns_rules(ipt):
        if not ipt.has_interface(bridge):
            gone += ipt("-D", DNS_CHAIN, *rule, check=False).returncode == 0
    for bridge, rule in _queue_rules(ipt):
        if not ipt.has_interface(bridge):
            gone += ipt("-t", "mangle", "-D", QUEUE_CHAIN, *rule, check=False).returncode == 0
    return gone


def _queue_rules(ipt: Iptables) -> list[tuple[str, list[str]]]:
    """(bridge, rule spec) of each TSM-EGRESSQ rule (mangle)."""
    found = []
    for line in ipt("-t", "mangle", "-S", QUEUE_CHAIN, check=False).stdout.splitlines():
        words = line.split()
        if words[:2] == ["-A", QUEUE_CHAIN] and "-i" in words:
            found.append((words[words.index("-i") + 1], words[2:]))
    return found


def sync_queue(bridge: str, number: int | None, mark: int, ipt: Iptables = HERE) -> None:
    """Send ``bridge``'s packets marked ``mark`` to NFQUEUE ``number`` (None: no rule). With no
    reader bound the packet goes on (--queue-bypass) still marked, and the egress table resets it:
    a refusal the node sees at once, not a hang."""
    want = [] if number is None else [
        ["-i", bridge, "-m", "mark", "--mark", f"{mark:#x}/{mark:#x}", "-j", "NFQUEUE", "--queue-num", str(number),
         "--queue-bypass"]]
    if ipt("-t", "mangle", "-n", "-L", QUEUE_CHAIN, check=False).returncode != 0:
        ipt("-t", "mangle", "-N", QUEUE_CHAIN)
    have = [rule for b, rule in _queue_rules(ipt) if b == bridge]
    for rule in have:
        if rule not in want:
            ipt("-t", "mangle", "-D", QUEUE_CHAIN, *rule, check=False)
    for rule in want:
        if rule not in have:
            ipt("-t", "mangle", "-A", QUEUE_CHAIN, *rule)
    if ipt("-t", "mangle", "-C", "FORWARD", "-j", QUEUE_CHAIN, check=False).returncode != 0:
        ipt("-t", "mangle", "-I", "FORWARD", "1", "-j", QUEUE_CHAIN)


def _dns_rules(ipt: Iptables) -> list[tuple[str, list[str]]]:
    """(bridge, rule spec) of each TSM-DNS rule."""
    found = []
    for line in ipt("-S", DNS_CHAIN, check=False).stdout.splitlines():
        words = line.split()
        if words[:2] == ["-A", DNS_CHAIN] and "-i" in words:
            found.append((words[words.index("-i") + 1], words[2:]))
    return found


def sync_dns(bridge: str, address: str | None, port: int = 53, ipt: Iptables = HERE, proxy_port: int = 0) -> None:
    """Open (address given) or close (None) the egress resolver's port (and the egress proxy's)
    on ``bridge``'s address."""
    opened = [("udp", port), ("tcp", port)] + ([("tcp", proxy_port)] if proxy_port else [])
    want = [] if address is None else [
        ["-d", f"{address}/32", "-i", bridge, "-p", proto, "-m", proto, "--dport", str(p), "-j", "ACCEPT"]
        for proto, p in opened]
    have = [rule for b, rule in _dns_rules(ipt) if b == bridge]
    for rule in have:
        if rule not in want:
            ipt("-D", DNS_CHAIN, *rule, check=False)
    for rule in want:
        if rule not in have:
            ipt("-A", DNS_CHAIN, *rule)


def remove(ipt: Iptables = HERE) -> None:
    """Take away our jumps and chains, and nothing else."""
    for parent, chain in (("INPUT", INPUT_CHAIN), ("INPUT", DNS_CHAIN), ("DOCKER-USER", FORWARD_CHAIN),
                          ("FORWARD", FORWARD_CHAIN)):
        while ipt("-D", parent, "-j", chain, check=False).returncode == 0:
            pass
    for chain in (INPUT_CHAIN, FORWARD_CHAIN, ALLOW_CHAIN, DNS_CHAIN):
        if ipt("-n", "-L", chain, check=False).returncode == 0:
            ipt("-F", chain)
            ipt("-X", chain)
    while ipt("-t", "mangle", "-D", "FORWARD", "-j", QUEUE_CHAIN, check=False).returncode == 0:
        pass
    if ipt("-t", "mangle", "-n", "-L", QUEUE_CHAIN, check=False).returncode == 0:
        ipt("-t", "mangle", "-F", QUEUE_CHAIN)
        ipt("-t", "mangle", "-X", QUEUE_CHAIN)


def _render(chain: str, rule: list[str]) -> str:
    """A rule as ``iptables -S`` prints it (addresses with their mask, as given here)."""
    return " ".join(["-A", chain, *rule])


def main(argv: list[str]) -> int:
    cmd = argv[1] if len(argv) > 1 else "show"
    try:
        if cmd == "install":
            install(BRIDGE_PREFIXES["open"], BRIDGE_PREFIXES["none"])
        elif cmd == "remove":
            remove()
        elif cmd == "show":
            for chain in (INPUT_CHAIN, FORWARD_CHAIN, ALLOW_CHAIN, DNS_CHAIN):
                print(HERE("-S", chain, check=False).stdout, end="")
        else:
            print("usage: python -m shared.firewall install|remove|show", file=sys.stderr)
            return 2
    except (NoPrivilege, FirewallError) as exc:
        print(f"firewall: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
