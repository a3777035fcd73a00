"""The Docker engine as a NodeBackend: containers and workspaces, composed with the other pieces.

Docker's words (labels, names, states) are in labels.py; the SDK client, the bounded pool every
blocking call runs in and the error mapping in client.py; node networks and their firewall in
networks.py; session workspaces and seeds here, on loop devices (loopdisk.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import docker
import docker.errors
from docker.models.containers import _create_container_args  # the SDK's run() kwargs -> the API's
from docker.types import DeviceRequest, LogConfig, Mount

from shared import firewall
from shared.config import BRIDGE_MAX_NODES, Config
from shared.egress import nft as egress_nft
from shared.egress.secrets import placeholder
from shared.engines.base import (
    Address,
    EngineInfo,
    NewNode,
    NodeBackend,
    NodeInfo,
    WorkspaceInfo,
)
from shared.engines.docker import loopdisk
from shared.engines.docker.client import Engine
from shared.engines.docker.events import EventFeed
from shared.engines.docker.labels import (
    DROP_KWARGS,
    LABEL_CLIENT,
    LABEL_CREATED,
    LABEL_IMAGE_FILE,
    LABEL_MANAGER,
    LABEL_PORT,
    LABEL_PROJECT,
    LABEL_REPLICA,
    LABEL_ROLE,
    LABEL_SESSION,
    LABEL_WORKSPACE,
    NETWORK_KWARGS,
    SECRET_ENV,
    SEED_DIR,
    SEED_NAME,
    SESSION_WORKSPACE_PREFIX,
    WORKSPACE_PREFIX,
    node_ip,
    owner_filter,
    parse_size,
    parse_time,
    state,
)
from shared.engines.docker.networks import NodeNetworks
from shared.errors import (
    BadRequest,
    ConfigError,
    ContainerGone,
    EngineError,
    EngineUnavailable,
    ImageMissing,
    WorkspaceUnavailable,
)
from shared.models import Role

log = logging.getLogger(__name__)
T = TypeVar("T")
# a pooled node boots at this CPU weight (cgroup cpu.shares; 1024 is a node's by default), so the
# boot of a refill's node (about 150 ms of CPU) yields to clients' nodes and the replica's work
BACKGROUND_CPU_SHARES = 2
DEFAULT_CPU_SHARES = 1024


class DockerBackend(NodeBackend):
    """One Docker engine, configured by engine.docker and the node section of the config."""

    def __init__(self, cfg: Config, timeout: int = 60) -> None:
        n, d = cfg.node, cfg.engine.docker
        self.docker_host = d.host
        self.node_port = n.port
        self.publish_host = n.publish_host
        self.advertise_host = n.advertise_host
        self._creation_kwargs = d.creation_kwargs
        self._device_requests = d.device_requests
        self._image_healthcheck = d.image_healthcheck
        self._read_only_root = n.read_only_root or n.disk.read_only_root
        self.workspace_path = n.workspace_path
        # None: nodes on the engine's default bridge with a published port, as before isolation
        self.network = n.network if n.network.isolated else None
        self.disk = n.disk
        self.runtime = d.runtime
        self.engine = Engine(d.host, d.threads, timeout)
        self.networks = NodeNetworks(self.engine, self.network) if self.network is not None else None
        # nodes resolve through this host's egress resolver on their bridge (shared/egress/)
        self.egress_dns = cfg.egress.enforce and self.network is not None
        # secrets outside nodes: placeholders in the node's environment, and the CA bundle it trusts
        self.egress_env = {k: placeholder(v) for k, v in cfg.egress.secret_env.items()} if self.egress_dns else {}
        self.egress_ca = cfg.egress.ca_cert_file if self.egress_dns else ""
        self.egress_ca_dir = cfg.egress.ca_bundle_dir

    @property
    def publish(self) -> bool:
        """Whether node ports are published on the host (else reached on the node network)."""
        return self.network is None or self.network.publish

    @property
    def client(self) -> docker.DockerClient:
        return self.engine.client

    @property
    def stream_client(self) -> docker.DockerClient:
        return self.engine.stream_client

    async def close(self) -> None:
        self.engine.close()

    async def _call(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        return await self.engine.call(fn, *args, **kw)

    # --- engine ---------------------------------------------------------------
    async def ping(self) -> None:
        """Raise EngineUnavailable unless the engine answers."""
        await self._call(self.client.api.ping)

    # --- the node image ---------------------------------------------------------
    @property
    def image(self) -> str:
        return str(self._creation_kwargs["image"])

    @property
    def node_memory_bytes(self) -> int:
        """creation_kwargs.mem_limit in bytes (0 when absent or unparsable)."""
        return parse_size(self._creation_kwargs.get("mem_limit"))

    @property
    def max_nodes(self) -> int:
        """An owner's isolated nodes share one bridge, whose ports (BRIDGE_MAX_NODES) bound them."""
        return BRIDGE_MAX_NODES if self.network is not None else 0

    async def image_present(self) -> bool:
        """Whether the engine has the node image (by name and tag, or digest)."""
        try:
            await self._call(self.client.api.inspect_image, self.image)
        except ImageMissing:
            return False
        except ContainerGone:  # an engine that words the 404 otherwise
            return False
        return True

    async def pull_image(self) -> None:
        """Pull the node image from its registry, logging progress; EngineError when it cannot."""
        image = self.image

        def pull() -> None:
            layers: dict[str, str] = {}
            done_states = ("Pull complete", "Already exists")
            last_log = 0.0
            for ev in self.client.api.pull(image, stream=True, decode=True):
                if ev.get("error"):  # the engine reports a failed pull inside the stream
                    raise EngineError(f"pulling {image}: {ev['error']}")
                if ev.get("id") and ev.get("status") and "progressDetail" in ev:
                    layers[ev["id"]] = ev["status"]
                now = time.monotonic()
                if now - last_log >= 2.0:
                    last_log = now
                    log.info("image_pull_progress image=%s layers_done=%d/%d status=%r", image,
                             sum(s in done_states for s in layers.values()), len(layers), ev.get("status", ""))

        t0 = time.monotonic()
        log.info("image_pull_started image=%s", image)
        await self._call(pull)
        log.info("image_pulled image=%s elapsed_s=%.1f", image, time.monotonic() - t0)

    # --- isolation --------------------------------------------------------------
    async def prepare(self, owner: str) -> dict[str, str]:
        """Check engine.docker.runtime, make the node network, install the host firewall; what is in place."""
        status: dict[str, str] = {}
        disk = self.disk
        if disk.workspace_bytes:
            # DOCKER_HOST counts too: docker.from_env() follows it
            engine = self.docker_host or os.environ.get("DOCKER_HOST", "")
            if engine and not engine.startswith("unix://"):
                raise ConfigError("node.disk.workspace_bytes needs the engine on this host (workspaces are "
                                  f"loop devices here), not {engine}; set it to 0")
            loopdisk.check_tools()
            status["disk"] = f"workspace {disk.workspace_bytes} bytes, /tmp {disk.tmp_bytes} bytes, read-only root"
        else:
            status["disk"] = "workspace unbounded"
        try:
            await self.check_runtime()
            if self.network is not None:
                await self.ensure_network(owner)
        except EngineUnavailable as exc:  # both are checked again at each creation
            log.warning("isolation_check_deferred reason=%s", exc.detail)
        if self.networks is None:
            status["network"] = "not isolated (node.network.isolated is false)"
            return status
        net = self.networks.network
        status["network"] = f"{self.networks.name(owner)} egress={net.egress}" + (" published" if net.publish else "")
        status["firewall"] = await self.networks.install_firewall(owner)
        return status

    async def check_runtime(self) -> None:
        """Raise ConfigError unless the engine knows engine.docker.runtime."""
        if not self.runtime:
            return
        known = (await self._call(self.client.api.info)).get("Runtimes") or {}
        if self.runtime not in known:
            raise ConfigError(f"engine.docker.runtime {self.runtime!r} is not registered with the engine "
                              f"(it knows {', '.join(sorted(known)) or 'none'}); see the README")

    # --- the pieces' work, under the interface's names ----------------------------------
    def network_name(self, owner: str) -> str:
        assert self.networks is not None
        return self.networks.name(owner)

    def bridge_name(self, owner: str) -> str:
        assert self.networks is not None
        return self.networks.bridge(owner)

    async def ensure_network(self, owner: str) -> str:
        assert self.networks is not None
        return await self.networks.ensure(owner)

    async def egress_bridge(self, owner: str) -> tuple[str, str, int] | None:
        """The node bridge's name and address, read from the host's interface (never the engine's
        IPAM Gateway, absent on an engine's first start)."""
        if self.networks is None:
            return None
        await self.networks.ensure(owner)
        name = self.bridge_name(owner)
        found = await asyncio.to_thread(egress_nft.interface_ipv4, name, await self.engine_netns(owner))
        return (name, *found) if found else None

    async def engine_netns(self, owner: str) -> int | None:
        """The pid whose network namespace holds owner's node bridge when that is not the manager's
        own (node.network.firewall_host_namespace: the chart's pods); None: here."""
        if self.networks is None or not self.networks.network.firewall_host_namespace:
            return None
        return await asyncio.to_thread(firewall.engine_pid, self.bridge_name(owner))

    def workspace_name(self, session_id: str) -> str:
        return SESSION_WORKSPACE_PREFIX + session_id

    async def create_workspace(self, node: NewNode) -> str:
        """The session's volume, labelled like its nodes: on a fresh fixed-size ext4 image when
        node.disk.workspace_bytes bounds it, else a plain local volume; its name."""
        name = self.workspace_name(node.session_id)
        labels = {LABEL_MANAGER: node.owner, LABEL_PROJECT: "toolserver-manager", LABEL_SESSION: node.session_id,
                  LABEL_ROLE: node.role, LABEL_REPLICA: node.replica_id, LABEL_CREATED: f"{node.created_at:.3f}"}
        if node.client:
            labels[LABEL_CLIENT] = node.client
        if not self.disk.workspace_bytes:
            await self._call(self.client.api.create_volume, name, driver="local", labels=labels)
            return name
        if not await self.image_present():  # a file system made for nothing costs a mkfs
            raise ImageMissing(self.image)
        path = os.path.join(self.disk.image_dir, name + ".img")
        if node.seed:
            making = asyncio.ensure_future(self._call(loopdisk.create_from, path, self._seed_path(node.seed)))
        else:
            making = asyncio.ensure_future(self._call(loopdisk.create, path, self.disk.workspace_bytes,
                                                      background=node.role == Role.POOLED))
        try:
            dev = await asyncio.shield(making)
        except asyncio.CancelledError:
            # the caller left (a client gone mid-creation), but the thread makes the image and attaches
            # its loop device all the same: wait for it, then take back what it made
            await asyncio.shield(self._unmake(making, path))
            raise
        try:
            if node.role == Role.POOLED:  # a fork may hand it another image (adopt_workspace)
                dev = await self._call(loopdisk.point_link, path, dev)
            await self._call(self.client.api.create_volume, name, driver="local",
                             driver_opts={"type": "ext4", "device": dev}, labels={**labels, LABEL_IMAGE_FILE: path})
        except BaseException:
            await asyncio.shield(self._call(loopdisk.destroy, path))
            raise
        return name

    async def _unmake(self, making: asyncio.Future[str], path: str) -> None:
        with contextlib.suppress(Exception):
            await making
        await self._call(loopdisk.destroy, path)

    async def ready_workspace(self, name: str) -> None:
        """Attach the workspace's image again if it lost its loop device, and point the volume at it."""
        vol = await self._call(self.client.api.inspect_volume, name)
        labels = vol.get("Labels") or {}
        path = labels.get(LABEL_IMAGE_FILE, "")
        if not path:
            return  # a plain volume: nothing to attach
        session = labels.get(LABEL_SESSION, name)
        try:
            dev = await self._call(loopdisk.attach, path)
        except loopdisk.DiskError as exc:
            raise WorkspaceUnavailable(session, exc.detail) from exc
        named = (vol.get("Options") or {}).get("device")
        if named == loopdisk.link_path(path):  # the volume names the image's link: lead it to the device
            await self._call(loopdisk.point_link, path, dev)
            return
        if named == dev:
            return
        # a volume's options are fixed at creation: made again (same name and labels) on the new
        # device; its files live in the image, not in the volume
        log.warning("workspace_reattached name=%s device=%s", name, dev)
        try:
            await self._call(self.client.api.remove_volume, name)
            await self._call(self.client.api.create_volume, name, driver="local",
                             driver_opts={"type": "ext4", "device": dev}, labels=labels)
        except EngineError as exc:
            raise WorkspaceUnavailable(session, exc.detail) from exc

    async def remove_workspace(self, name: str) -> None:
        await self._remove_workspace(name)

    async def workspaces(self, owner: str) -> list[WorkspaceInfo]:
        """Every session workspace of owner (one engine call)."""
        raw = await self._call(self.client.api.volumes, filters={"label": [f"{LABEL_MANAGER}={owner}", LABEL_SESSION]})
        out = []
        for vol in (raw or {}).get("Volumes") or []:
            labels = vol.get("Labels") or {}
            out.append(WorkspaceInfo(
                name=vol["Name"], session_id=labels.get(LABEL_SESSION, ""), owner=owner,
                role=labels.get(LABEL_ROLE, Role.NODE), replica_id=labels.get(LABEL_REPLICA, ""),
                created=float(labels.get(LABEL_CREATED) or 0), client=labels.get(LABEL_CLIENT, "")))
        return out

    async def _remove_workspace(self, name: str) -> None:
        """Remove a workspace volume, detach its loop device and delete its image."""
        try:
            vol = await self._call(self.client.api.inspect_volume, name)
        except ContainerGone:
            # a creation that died between its image and its volume (a fork's copy, say) left the
            # image alone: it is found by the name it was given
            if name.startswith(SESSION_WORKSPACE_PREFIX) and self.disk.workspace_bytes:
                await self._call(loopdisk.destroy, os.path.join(self.disk.image_dir, name + ".img"))
            return
        path = (vol.get("Labels") or {}).get(LABEL_IMAGE_FILE, "")
        with contextlib.suppress(ContainerGone):
            await self._call(self.client.api.remove_volume, name, force=True)
        if path:
            await self._call(loopdisk.destroy, path)

    # --- seeds: saved workspace images, beside the workspaces' --------------------------------
    def _seed_path(self, seed: str) -> str:
        if not SEED_NAME.fullmatch(seed):
            raise ValueError(f"invalid seed name {seed!r}")
        return os.path.join(self.disk.image_dir, SEED_DIR, seed + ".img")

    async def capture_workspace(self, name: str, seed: str) -> float:
        """Copy the workspace's image file sparse, its file system frozen (when a node mounts it)
        only for the copy: fsfreeze holds writes and serves reads, so the node answers throughout."""
        vol = await self._call(self.client.api.inspect_volume, name)
        path = (vol.get("Labels") or {}).get(LABEL_IMAGE_FILE, "")
        if not path:
            raise BadRequest("copying a workspace needs bounded workspaces (node.disk.workspace_bytes > 0): "
                             "this session's is a plain volume")

        def capture() -> float:
            mount = loopdisk.mount_point(loopdisk.device_of(path))
            if mount:
                return loopdisk.capture(path, self._seed_path(seed), mount)
            # not mounted where this process sees (the engine in a mount namespace of its own, a
            # manager in a container): a node that runs on it sees it at the workspace path
            for c in self.client.api.containers(filters={"volume": name, "status": ["running", "paused"]}):
                pid = int((self.client.api.inspect_container(c["Id"]).get("State") or {}).get("Pid") or 0)
                if pid:
                    return loopdisk.capture(path, self._seed_path(seed), self.workspace_path, pid=pid)
            return loopdisk.capture(path, self._seed_path(seed))  # no node mounts it: it is still

        return await self._call(capture)

    async def drop_seed(self, seed: str) -> None:
        await self._call(loopdisk.with_unlink, self._seed_path(seed))

    async def adopt_workspace(self, name: str, seed: str) -> None:
        """Make the running node of workspace name (a pooled node's) hold a copy of seed instead of
        its own files, in place: no new container, its next calls see the copy."""
        vol = await self._call(self.client.api.inspect_volume, name)
        path = (vol.get("Labels") or {}).get(LABEL_IMAGE_FILE, "")
        if not path or (vol.get("Options") or {}).get("device") != loopdisk.link_path(path):
            raise BadRequest(f"workspace {name} cannot take another image (its volume names a device)")

        def adopt() -> None:
            for c in self.client.api.containers(filters={"volume": name, "status": ["running"]}):
                pid = int((self.client.api.inspect_container(c["Id"]).get("State") or {}).get("Pid") or 0)
                if pid:
                    return loopdisk.adopt(path, self._seed_path(seed), pid, self.workspace_path)
            raise ContainerGone(f"no running node mounts {name}")

        await self._call(adopt)

    async def export_seed(self, seed: str) -> AsyncIterator[bytes]:
        """A seed's bytes as a sparse tar stream (holes are not sent), opened."""
        path = self._seed_path(seed)
        if not os.path.exists(path):
            raise ContainerGone(f"no saved workspace {seed}")
        proc = await asyncio.create_subprocess_exec(
            "tar", "--sparse", "--hole-detection=seek", "-C", os.path.dirname(path), "-cf", "-",
            os.path.basename(path), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        return self._tar_chunks(proc)

    @staticmethod
    async def _tar_chunks(proc: asyncio.subprocess.Process) -> AsyncIterator[bytes]:
        assert proc.stdout is not None
        try:
            while chunk := await proc.stdout.read(1 << 20):
                yield chunk
            if await proc.wait() != 0:
                raise EngineError(f"tar of a saved workspace exited with {proc.returncode}")
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    async def import_seed(self, seed: str, chunks: AsyncIterator[bytes]) -> None:
        """Make the seed seed from a stream export_seed wrote (on another host, say)."""
        dest = self._seed_path(seed)
        tmp = dest + ".part.d"
        os.makedirs(tmp, mode=0o700)
        try:
            proc = await asyncio.create_subprocess_exec("tar", "-xf", "-", "-C", tmp, stdin=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.PIPE)
            assert proc.stdin is not None
            try:
                async for chunk in chunks:
                    proc.stdin.write(chunk)
                    await proc.stdin.drain()
                proc.stdin.close()
                _, err = await proc.communicate()
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            names = os.listdir(tmp)
            if proc.returncode != 0 or len(names) != 1:
                raise EngineError(f"receiving a saved workspace failed: {err.decode(errors='replace')[:200]}")
            os.rename(os.path.join(tmp, names[0]), dest)
        finally:
            await asyncio.to_thread(shutil.rmtree, tmp, True)

    async def drop_stale_seeds(self, prefix: str, older_than: float, keep: set[str]) -> int:
        def drop() -> int:
            folder = os.path.join(self.disk.image_dir, SEED_DIR)
            gone = 0
            with contextlib.suppress(FileNotFoundError):
                for entry in os.scandir(folder):
                    # <seed>.img, and what a copy left half made: <seed>.img.part, <seed>.img.part.d
                    if not entry.name.startswith(prefix) or entry.name.split(".", 1)[0] in keep \
                            or entry.stat().st_mtime >= older_than:
                        continue
                    if entry.is_dir():
                        shutil.rmtree(entry.path, ignore_errors=True)
                    else:
                        loopdisk.with_unlink(entry.path)
                    gone += 1
            return gone

        return await self._call(drop)

    async def seed_bytes(self, seed: str) -> int:
        return await self._call(loopdisk.disk_bytes, self._seed_path(seed))

    async def collect_storage(self, owner: str, older_than: float) -> int:
        """Remove owner's workspaces of removed containers (not sessions'), made before older_than."""
        raw = await self._call(self.client.api.volumes,
                               filters={"label": [f"{LABEL_MANAGER}={owner}"], "dangling": True})
        gone = 0
        for vol in (raw or {}).get("Volumes") or []:
            labels = vol.get("Labels") or {}
            if vol["Name"].startswith(WORKSPACE_PREFIX) and float(labels.get(LABEL_CREATED) or 0) < older_than:
                await self._remove_workspace(vol["Name"])
                gone += 1
        return gone

    # --- containers -----------------------------------------------------------
    async def create(self, node: NewNode) -> str:
        """Create (not start) a node container with its labels, named after its session; its id.

        The secret reaches the node as NODE_SECRET in its environment (never in a label: labels
        are listed by anyone who lists containers, and shown by the admin API). The session's
        workspace is mounted at node.workspace_path; with a read-only root, it and /tmp are all
        the node can write. A name is unique on an engine: a second container for the same
        session is refused (EngineError naming the conflict).
        """
        creation_kwargs = self._creation_kwargs
        device_requests = self._device_requests
        labels = {LABEL_MANAGER: node.owner, LABEL_ROLE: node.role, LABEL_CREATED: f"{node.created_at:.3f}",
                  LABEL_REPLICA: node.replica_id}
        if node.client:
            labels[LABEL_CLIENT] = node.client
        if node.session_id:
            labels[LABEL_SESSION] = node.session_id
        if node.workspace:
            labels[LABEL_WORKSPACE] = node.workspace
        kwargs = {k: v for k, v in creation_kwargs.items() if k not in DROP_KWARGS}
        if node.role == Role.POOLED:  # boots in the background: foreground() gives its weight back
            kwargs["cpu_shares"] = BACKGROUND_CPU_SHARES
        if not self._image_healthcheck:  # the engine's exec every interval: see engine.docker.image_healthcheck
            kwargs.setdefault("healthcheck", {"test": ["NONE"]})
        disk = self.disk
        if self._read_only_root:
            kwargs["read_only"] = True
            kwargs.setdefault("tmpfs", {"/tmp": f"rw,exec,nosuid,nodev,size={disk.tmp_bytes}"})
        # the engine makes a named volume that is missing when the container is created (a workspace
        # removed in between) and an anonymous one always: with these labels either is still ours to
        # find and remove by manager_id, not an unlabelled leftover (a volume with existing labels
        # keeps them: the engine reads these only when it makes the volume)
        volume_labels = {LABEL_MANAGER: node.owner, LABEL_PROJECT: "toolserver-manager"}
        if node.session_id:
            volume_labels[LABEL_SESSION] = node.session_id
        if node.workspace:
            kwargs["mounts"] = [*kwargs.get("mounts", []),
                                Mount(target=self.workspace_path, source=node.workspace, type="volume",
                                      labels=volume_labels)]
        elif self._read_only_root:  # anonymous: kept across restarts, removed with the node
            kwargs["mounts"] = [*kwargs.get("mounts", []),
                                Mount(target=self.workspace_path, source=None, type="volume", labels=volume_labels)]
        if disk.log_bytes:
            kwargs["log_config"] = LogConfig(type="json-file", config={
                "max-size": str(max(disk.log_bytes // 2, 1 << 16)), "max-file": "2"})
        if self.runtime:
            kwargs["runtime"] = self.runtime
        image = kwargs.pop("image")
        kwargs["labels"] = {**dict(creation_kwargs.get("labels") or {}), **labels,
                            LABEL_PORT: str(self.node_port), LABEL_PROJECT: "toolserver-manager"}
        if node.session_id:
            kwargs["name"] = node.session_id
        if self.network is not None:
            for k in NETWORK_KWARGS:
                kwargs.pop(k, None)
            kwargs["network"] = await self.ensure_network(node.owner)
            if self.egress_dns:
                # the engine's embedded DNS forwards to it from inside the node's namespace, so the
                # resolver sees the node's own address; the engine takes no port here (53)
                bridge = await self.egress_bridge(node.owner)
                if bridge is None:
                    raise EngineError(f"the node network of {node.owner} has no IPv4 address for the egress resolver")
                kwargs["dns"] = [bridge[1]]
            # the node network has no IPv6: no link-local path to the host either
            kwargs["sysctls"] = {**dict(kwargs.get("sysctls") or {}), "net.ipv6.conf.all.disable_ipv6": "1"}
        if self.publish:
            kwargs["ports"] = {f"{self.node_port}/tcp": (self.publish_host, None)}
        if device_requests:
            kwargs["device_requests"] = [DeviceRequest(**r) for r in device_requests]
        if node.secret or self.egress_env or self.egress_ca:
            env = kwargs.get("environment") or {}
            if isinstance(env, list):
                env = dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
            env = {**env, **self.egress_env}
            if self.egress_ca:
                bundle = await asyncio.to_thread(egress_ca_bundle, self.egress_ca, self.egress_ca_dir)
                kwargs["mounts"] = [*kwargs.get("mounts", []),
                                    Mount(target=NODE_CA_BUNDLE, source=bundle, type="bind", read_only=True)]
                env.update({v: NODE_CA_BUNDLE for v in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")})
            kwargs["environment"] = {**env, SECRET_ENV: node.secret} if node.secret else env

        def create() -> str:
            # docker-py's run() kwargs (mem_limit, cap_drop, ...) translated as its high-level create
            # does, without the inspect that call adds to build a Container we never use: one engine
            # round trip per creation instead of two
            args = _create_container_args({"command": None, **kwargs, "image": image,
                                           "version": self.client.api._version})
            return str(self.client.api.create_container(**args)["Id"])

        try:
            return await self._call(create)
        except ImageMissing as exc:
            raise ImageMissing(image) from exc
        except EngineError as exc:
            if "network" in exc.detail and "not found" in exc.detail and self.networks is not None:
                self.networks.forget(node.owner)  # removed behind our back: made again next time
            if "runtime" in exc.detail and self.runtime:
                raise EngineError(f"engine.docker.runtime {self.runtime!r} is not registered with the engine "
                                  f"({exc.detail}); see the README") from exc
            raise

    async def foreground(self, node_id: str) -> None:
        """The configured CPU weight (creation_kwargs' cpu_shares, else the engine's default) back
        on a node that booted in the background."""
        shares = int(self._creation_kwargs.get("cpu_shares") or DEFAULT_CPU_SHARES)
        await self._call(self.client.api.update_container, node_id, cpu_shares=shares)

    async def start(self, node_id: str) -> Address:
        """Start a container; its node port is published on a host port the engine picks."""
        for attempt in range(3):
            try:
                await self._call(self.client.api.start, node_id)
                break
            except EngineError as exc:
                # the engine picked a random host port that something else took meanwhile (another
                # engine on the same host, say): starting again picks another one
                if attempt == 2 or ("port is already allocated" not in exc.detail and \
                        "external connectivity" not in exc.detail):
                    raise
                log.warning("node_start_retry node_id=%s error=%s", node_id[:12], exc.detail[:120])
        return (await self.inspect(node_id)).address

    async def restart(self, node_id: str, timeout: int = 5) -> Address:
        await self._call(self.client.api.restart, node_id, timeout=timeout)
        return (await self.inspect(node_id)).address

    async def stop(self, node_id: str, timeout: int = 5) -> None:
        await self._call(self.client.api.stop, node_id, timeout=timeout)

    async def pause(self, node_id: str) -> None:
        await self._call(self.client.api.pause, node_id)

    async def unpause(self, node_id: str) -> None:
        try:
            await self._call(self.client.api.unpause, node_id)
        except EngineError as exc:
            if "is not paused" not in exc.detail:  # thawed meanwhile by another caller: what we wanted
                raise

    async def remove(self, node_id: str) -> bool:
        """Kill and remove a container (and a workspace that dies with it, as containers made before
        sessions had their own have; a session's workspace is kept); False when it was already gone."""
        try:
            data = await self._call(self.client.api.inspect_container, node_id)
        except ContainerGone:
            return False
        workspaces = [m["Name"] for m in data.get("Mounts") or []
                      if m.get("Type") == "volume" and str(m.get("Name", "")).startswith(WORKSPACE_PREFIX)]
        try:
            await self._call(self.client.api.remove_container, node_id, force=True, v=True)
        except ContainerGone:
            return False
        except EngineError as exc:
            if "already in progress" in exc.detail:
                return True
            raise
        for name in workspaces:
            await self._remove_workspace(name)
        return True

    def _info(self, cid: str, status: str, health: str, labels: dict[str, str], created: float, port: int,
              image: str, ip: str = "") -> NodeInfo:
        # a published port is reached at the advertised host; an unpublished node at its address
        # on the node network (only while it runs: a stopped container has none)
        host = self.advertise_host
        if not port and ip:
            host, port = ip, int(labels.get(LABEL_PORT, self.node_port))
        return NodeInfo(id=cid, owner=labels.get(LABEL_MANAGER, ""), role=labels.get(LABEL_ROLE, Role.NODE),
                        status=state(status), health=health, created=created, host=host,
                        port=port, replica_id=labels.get(LABEL_REPLICA, ""), client=labels.get(LABEL_CLIENT, ""),
                        image=image, meta=labels, session_id=labels.get(LABEL_SESSION, ""),
                        workspace=labels.get(LABEL_WORKSPACE, ""), ip=ip)

    async def inspect(self, node_id: str) -> NodeInfo:
        data = await self._call(self.client.api.inspect_container, node_id)
        state = data.get("State") or {}
        ports = ((data.get("NetworkSettings") or {}).get("Ports") or {}).get(f"{self.node_port}/tcp") or []
        labels = (data.get("Config") or {}).get("Labels") or {}
        return self._info(data["Id"], state.get("Status", "unknown"),
                          ((state.get("Health") or {}).get("Status")) or "none", labels,
                          float(labels.get(LABEL_CREATED) or parse_time(data.get("Created", ""))),
                          int(ports[0]["HostPort"]) if ports else 0, (data.get("Config") or {}).get("Image", ""),
                          node_ip(data.get("NetworkSettings") or {}) if state.get("Running") else "")

    async def node_secret(self, node_id: str) -> str:
        """The secret a node was created with, from the container's own config ("" if none)."""
        data = await self._call(self.client.api.inspect_container, node_id)
        for item in (data.get("Config") or {}).get("Env") or []:
            if item.startswith(SECRET_ENV + "="):
                return str(item[len(SECRET_ENV) + 1:])
        return ""

    async def nodes(self, owner: str, role: str | None = None) -> list[NodeInfo]:
        """One engine call: every container (any state) of owner, optionally of one role."""
        raw = await self._call(self.client.api.containers, all=True, filters={"label": owner_filter(owner, role)})
        out = []
        for c in raw:
            labels = c.get("Labels") or {}
            port = 0
            for p in c.get("Ports") or []:
                if p.get("PrivatePort") == int(labels.get(LABEL_PORT, self.node_port)) and p.get("PublicPort"):
                    port = int(p["PublicPort"])
                    break
            status_text = c.get("Status", "")
            health = "none"
            for h in ("healthy", "unhealthy", "health: starting"):
                if f"({h})" in status_text:
                    health = h.replace("health: ", "")
                    break
            ip = node_ip(c.get("NetworkSettings") or {}) if c.get("State") == "running" else ""
            out.append(self._info(c["Id"], c.get("State", "unknown"), health, labels,
                                  float(labels.get(LABEL_CREATED) or c.get("Created") or 0), port, c.get("Image", ""),
                                  ip))
        return out

    async def stats(self, node_id: str) -> dict[str, Any]:
        """One non-streaming stats sample: memory and CPU of a running container."""
        raw = await self._call(self.client.api.stats, node_id, stream=False)
        mem = raw.get("memory_stats") or {}
        cpu = raw.get("cpu_stats") or {}
        return {"memory_bytes": mem.get("usage"), "memory_limit_bytes": mem.get("limit"),
                "cpu_total_ns": (cpu.get("cpu_usage") or {}).get("total_usage"),
                "pids": (raw.get("pids_stats") or {}).get("current")}

    async def logs(self, node_id: str, tail: int, follow: bool) -> AsyncIterator[bytes]:
        """The container's log: last tail lines, then (follow) new output until it stops or we close."""
        stream = await self._call(self.stream_client.api.logs, node_id, stdout=True, stderr=True, stream=True,
                                  follow=follow, tail=tail)
        return self._log_chunks(node_id, stream)

    async def _log_chunks(self, node_id: str, stream: Any) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=64)  # a slow reader slows the pump
        closed = threading.Event()

        def put(item: bytes | None) -> None:
            fut = asyncio.run_coroutine_threadsafe(chunks.put(item), loop)
            while not closed.is_set():
                try:
                    fut.result(timeout=0.5)
                    return
                except TimeoutError:
                    continue
            fut.cancel()

        def pump() -> None:
            # a thread of its own, not the pool's: a follow holds it for as long as someone reads
            try:
                for chunk in stream:
                    if closed.is_set():
                        break
                    put(chunk)
            except Exception as exc:
                if not closed.is_set():
                    log.info("log_stream_ended node_id=%s error=%r", node_id[:12], exc)
            finally:
                if not closed.is_set():
                    put(None)

        threading.Thread(target=pump, name="docker-logs", daemon=True).start()
        try:
            while (chunk := await chunks.get()) is not None:
                yield chunk
        finally:
            closed.set()
            with contextlib.suppress(Exception):
                await loop.run_in_executor(None, stream.close)

    async def info(self) -> EngineInfo:
        """Engine facts for cluster-wide reads."""
        raw = await self._call(self.client.api.info)
        meta = {k: raw.get(k) for k in ("Name", "ServerVersion", "Containers", "ContainersRunning",
                                        "ContainersStopped", "NCPU", "MemTotal")}
        return EngineInfo(name=str(raw.get("Name") or ""), version=str(raw.get("ServerVersion") or ""),
                          nodes=int(raw.get("Containers") or 0), running=int(raw.get("ContainersRunning") or 0),
                          stopped=int(raw.get("ContainersStopped") or 0), cpus=int(raw.get("NCPU") or 0),
                          memory_bytes=int(raw.get("MemTotal") or 0), meta=meta)

    def changes(self, owner: str) -> EventFeed:
        """owner's container events as one long-lived stream (events.py)."""
        return EventFeed(self.engine.host, owner)


NODE_CA_BUNDLE = "/etc/toolserver-manager/ca-bundle.pem"  # in the node: the host's CAs and the cluster's
SYSTEM_CAS = "/etc/ssl/certs/ca-certificates.crt"


def egress_ca_bundle(ca_file: str, folder: str) -> str:
    """The host's CA bundle plus the cluster's egress CA, as one file nodes mount (written when it changed)."""
    with open(ca_file, "rb") as f:
        ours = f.read()
    try:
        with open(SYSTEM_CAS, "rb") as f:
            system = f.read()
    except OSError:
        system = b""
    data = system + b"\n" + ours
    path = os.path.join(folder, "ca-bundle-" + hashlib.sha256(data).hexdigest()[:16] + ".pem")
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        tmp = path + f".{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    return path
