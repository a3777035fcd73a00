"""A session's egress policy: what it may reach, by address range and by name.

A policy is a default (``allow``: the public internet, ``deny``: nothing) and two lists of
rules; a rule is an address range (``203.0.113.0/24``, ``198.51.100.7``), an exact name
(``api.example.com``) or a wildcard (``*.example.com``: every name below, not the name itself).
Deny rules win over allow rules, and the platform deny set (``platform_deny``) wins over both:
no policy opens the host, the node bridge, other sessions or link-local/metadata addresses.

Names are enforced by what resolved (shared/egress/dns.py): a name the policy does not allow
gets NXDOMAIN, and an allowed name's answers open exactly those addresses for the record's TTL.
A deny-by-name under ``default: allow`` only hides the name: its addresses stay reachable as
any public address is; to close an address, deny its range.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

import msgspec

from shared.errors import BadRequest

ACTIONS = ("allow", "deny")
MAX_RULES = 256  # per list: the host's firewall set and the resolver's matching stay small
# a DNS name: labels of letters, digits, hyphens (and underscores, seen in SRV-style names)
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
# never reachable whatever a policy says (the firewall's BLOCKED ranges cover the private ones
# unless node.network.allow_cidrs opens them): link-local and cloud metadata, loopback, "this
# network", multicast and broadcast. The host's own addresses and the node bridge are added per host.
PLATFORM_DENY = ("169.254.0.0/16", "127.0.0.0/8", "0.0.0.0/8", "224.0.0.0/4", "255.255.255.255/32")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class EgressPolicy(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """What one session may reach (see the module's docstring)."""

    default: str = "allow"
    allow: list[str] = msgspec.field(default_factory=list)
    deny: list[str] = msgspec.field(default_factory=list)


def is_name(rule: str) -> bool:
    """Whether a (validated) rule is a name, not an address range."""
    return not _as_network(rule)


def _as_network(rule: str) -> Network | None:
    try:
        return ipaddress.ip_network(rule, strict=False)
    except ValueError:
        return None


def _check_name(rule: str) -> str:
    name = rule.lower().rstrip(".")
    body = name[2:] if name.startswith("*.") else name
    labels = body.split(".")
    if len(name) > 253 or len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        raise BadRequest(f"egress rule {rule!r} is neither an address range nor a name "
                         "(api.example.com, *.example.com)")
    if labels[-1].isdigit():
        raise BadRequest(f"egress rule {rule!r} looks like an address but is not one")
    return name


def _overlaps_platform(net: Network, platform: Iterable[Network]) -> Network | None:
    """The platform range an allow rule lies inside (a rule wider than it is allowed: the
    platform set is carved out of it at enforcement)."""
    for p in platform:
        if net.version == p.version and net.subnet_of(p):  # type: ignore[arg-type]
            return p
    return None


def validate(raw: object, platform: Iterable[str] = PLATFORM_DENY) -> EgressPolicy:
    """A policy from JSON-like input, normalized; BadRequest (naming the fault) otherwise."""
    try:
        pol = msgspec.convert(raw, EgressPolicy)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"egress policy: {exc}") from None
    if pol.default not in ACTIONS:
        raise BadRequest(f"egress policy: default must be one of {', '.join(ACTIONS)}, not {pol.default!r}")
    nets = [ipaddress.ip_network(p, strict=False) for p in platform]
    out: dict[str, list[str]] = {}
    for field in ("allow", "deny"):
        rules: list[str] = getattr(pol, field)
        if len(rules) > MAX_RULES:
            raise BadRequest(f"egress policy: {field} has {len(rules)} rules; at most {MAX_RULES}")
        clean: list[str] = []
        for rule in rules:
            if not isinstance(rule, str) or not rule.strip():
                raise BadRequest(f"egress policy: {field} has an empty rule")
            net = _as_network(rule.strip())
            if net is not None:
                hit = _overlaps_platform(net, nets) if field == "allow" else None
                if hit is not None:
                    raise BadRequest(f"egress rule {rule!r} is inside the platform deny set ({hit}): "
                                     "no policy can open it")
                item = str(net)
            else:
                item = _check_name(rule.strip())
            if item not in clean:
                clean.append(item)
        out[field] = clean
    return EgressPolicy(default=pol.default, allow=out["allow"], deny=out["deny"])


def name_matches(name: str, rule: str) -> bool:
    """Whether a (lower-case, dot-less at the end) name is what a name rule says."""
    if rule.startswith("*."):
        return name.endswith(rule[1:])
    return name == rule


def name_allowed(pol: EgressPolicy, name: str) -> tuple[bool, str]:
    """Whether the resolver may answer for ``name``, and the rule that decided ("" = the default)."""
    name = name.lower().rstrip(".")
    for rule in pol.deny:
        if is_name(rule) and name_matches(name, rule):
            return False, rule
    for rule in pol.allow:
        if is_name(rule) and name_matches(name, rule):
            return True, rule
    return pol.default == "allow", ""


def networks(pol: EgressPolicy, field: str) -> list[Network]:
    """The address ranges among a policy's allow or deny rules."""
    return [n for n in (_as_network(r) for r in getattr(pol, field)) if n is not None]


def public(pol: EgressPolicy) -> dict[str, object]:
    """A policy as the API shows it."""
    return msgspec.structs.asdict(pol)
