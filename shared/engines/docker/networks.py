"""Node networks on the Docker engine: a bridge per owner with traffic between nodes off, named
so the host firewall (shared/firewall.py) knows it, and that firewall installed for it."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time

import docker.errors

from shared import firewall
from shared.config import NetworkConfig
from shared.engines.docker.client import Engine
from shared.engines.docker.labels import LABEL_EGRESS, LABEL_MANAGER, LABEL_PROJECT, NETWORK_PREFIX
from shared.errors import ConfigError

log = logging.getLogger(__name__)

# how long a creator that lost the race waits for the winner's network to be listed
RACE_WAIT_SECONDS = 10.0


class NodeNetworks:
    """The node networks of one engine, by owner (manager_id), as node.network configures them."""

    def __init__(self, engine: Engine, network: NetworkConfig) -> None:
        self.engine = engine
        self.network = network
        self._made: dict[str, str] = {}  # owner -> node network name, once ensured

    def forget(self, owner: str) -> None:
        """The network was removed behind our back: made again at the next ensure."""
        self._made.pop(owner, None)

    def name(self, owner: str) -> str:
        return f"{NETWORK_PREFIX}{owner}-{self.network.egress}"

    def bridge(self, owner: str) -> str:
        """The host interface of a node network: a firewall prefix, then a hash (15 chars at most)."""
        return firewall.BRIDGE_PREFIXES[self.network.egress] + hashlib.sha256(owner.encode()).hexdigest()[:10]

    async def ensure(self, owner: str) -> str:
        """The node network of owner, created if missing (idempotent, race-safe); its name."""
        name = self._made.get(owner)
        if name:
            return name
        name = self.name(owner)
        egress = self.network.egress

        def exists() -> bool:
            found = [n for n in self.engine.client.api.networks(names=[name]) if n.get("Name") == name]
            if found:
                labels = found[0].get("Labels") or {}
                if labels.get(LABEL_MANAGER) != owner:
                    raise ConfigError(f"a network named {name} exists that is not this manager's "
                                      f"(label {LABEL_MANAGER}={labels.get(LABEL_MANAGER)!r})")
            return bool(found)

        def ensure() -> None:
            if exists():
                return
            try:
                self.engine.client.api.create_network(
                    name, driver="bridge", check_duplicate=True, internal=egress == "none",
                    labels={LABEL_MANAGER: owner, LABEL_PROJECT: "toolserver-manager", LABEL_EGRESS: egress},
                    options={"com.docker.network.bridge.enable_icc": "false",
                             "com.docker.network.bridge.name": self.bridge(owner)})
            except docker.errors.APIError:
                # another replica or worker is making it: the engine answers 409 for the name, or 403
                # "networks have same bridge name" when both passed the duplicate check, and then the
                # other's network may not be listed yet (1 round in 20 of 4 racing creators): wait for it
                deadline = time.monotonic() + RACE_WAIT_SECONDS
                while not exists():
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)

        await self.engine.call(ensure)
        self._made[owner] = name
        return name

    async def install_firewall(self, owner: str) -> str:
        """Install the host firewall for owner's bridge; what is in place, in words for /ready."""
        net = self.network
        if not net.firewall:
            return "off (node.network.firewall is false)"
        # always given, so a restart without allow_cidrs takes a former exception away
        allow = {self.bridge(owner): list(net.allow_cidrs)}
        try:
            ipt = (await asyncio.to_thread(firewall.Iptables.of_engine, self.bridge(owner))
                   if net.firewall_host_namespace else firewall.HERE)
            prefixes = firewall.BRIDGE_PREFIXES
            await asyncio.to_thread(firewall.install, prefixes["open"], prefixes["none"], allow, ipt)
            return "installed"
        except firewall.NoPrivilege as exc:
            log.warning("firewall_not_installed reason=%r: nodes can reach the host's own services and "
                        "private ranges; run `bash scripts/firewall.sh install` as root", str(exc))
            return f"not installed: {exc}"
