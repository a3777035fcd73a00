"""``toolserver-manager``: run one manager replica (with its built-in checker) under uvicorn."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import resource
import shutil
import socket
import sys
import tempfile
from typing import Any

import uvicorn
from uvicorn.supervisors import Multiprocess

from manager.edge.protocol import EdgeHttpProtocol, Limits
from shared.config import Config, load_config
from shared.errors import ConfigError
from shared.logs import setup_logging


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="toolserver-manager", description=__doc__)
    p.add_argument("--config", "-c", help="YAML config file (default: $TSM_CONFIG)")
    p.add_argument("--host", help="listen address (config: host)")
    p.add_argument("--port", type=int, help="listen port (config: port)")
    p.add_argument("--workers", type=int, help="uvicorn worker processes (config: workers)")
    p.add_argument("--manager-id", help="config: manager_id")
    return p.parse_args(argv)


def _overrides(ns: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("host", "port", "workers", "manager_id"):
        value = getattr(ns, key)
        if value is not None:
            out[key] = value
    return out


def app_factory() -> Any:
    """Used by uvicorn in each worker process when workers > 1 (config from the environment)."""
    from manager.app import create_app

    cfg = load_config(overrides=_env_json_overrides())
    # each worker is a replica of its own: a replica_id from the file would be shared by all
    if not cfg.replica_id.endswith(f"-{os.getpid()}") and f"-{os.getpid()}-" not in cfg.replica_id:
        cfg.replica_id = f"{cfg.replica_id}-w{os.getpid()}"
    setup_logging(cfg.logger_level, cfg.log_format, cfg.replica_id, cfg.manager_id)
    return create_app(cfg)


def _env_json_overrides() -> dict[str, Any]:
    import json

    raw = os.environ.get("TSM_CLI_OVERRIDES")
    return json.loads(raw) if raw else {}


FD_RESERVE = 512  # descriptors kept for Redis, the engine, logs and listening sockets


def _connection_cap(wanted: int) -> int:
    """The client connections one process may hold: each proxied one can use two descriptors (the
    client's and the node's). Raises the soft descriptor limit to the hard one, and lowers the cap
    (saying so) when even that is too few: refusing with a 503 beats failing accept() for everyone."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    except (ValueError, OSError):
        return wanted
    if soft == resource.RLIM_INFINITY:
        return wanted
    fits = max(16, (soft - FD_RESERVE) // 2)
    if wanted <= 0 or wanted > fits:
        logging.getLogger(__name__).warning(
            "connection_cap_lowered wanted=%s cap=%s nofile=%s (raise the descriptor limit: ulimit -n)",
            wanted or "unbounded", fits, soft)
        return fits
    return wanted


TICK_SECONDS = 1.0  # the server's own loop: the Date header's resolution (uvicorn ticks every 0.1 s)


class _Server(uvicorn.Server):
    """Leaves the registry and hands the lease over as soon as a stop signal arrives,
    before uvicorn waits for in-flight requests to finish."""

    _wake: asyncio.Event | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    async def main_loop(self) -> None:
        # uvicorn's loop ticks every 0.1 s for what changes once a second (the Date header) and for
        # the exit flag: ten wakeups a second of an idle replica (issue 26). Here it ticks once a
        # second, every tick a date tick, and a stop signal wakes it at once, so a stop is as prompt
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 10) % 864000
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK_SECONDS)
            self._wake.clear()

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        if self._wake is not None and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already closed: nothing waits
                self._loop.call_soon_threadsafe(self._wake.set)
        app = self.config.loaded_app
        while hasattr(app, "app") and not hasattr(app, "state"):
            app = app.app
        if app is not None and hasattr(app, "state"):
            from manager.app import begin_shutdown

            asyncio.get_event_loop().create_task(begin_shutdown(app))


def main(argv: list[str] | None = None) -> None:
    ns = _args(argv)
    try:
        cfg: Config = load_config(ns.config, overrides=_overrides(ns))
    except ConfigError as exc:
        print(f"toolserver-manager: {exc.detail}", file=sys.stderr)
        sys.exit(2)
    setup_logging(cfg.logger_level, cfg.log_format, cfg.replica_id, cfg.manager_id)
    common: dict[str, Any] = {"host": cfg.host, "port": cfg.port, "server_header": False, "log_config": None,
                              "access_log": False, "ws_max_size": cfg.proxy.websocket_max_message_bytes,
                              # messages a client sent that wait for the node: 2, not uvicorn's 32
                              "ws_max_queue": 2,
                              # the client's address is the peer's, or what a balancer in quota.trusted_proxies
                              # says (manager/client_auth.py): uvicorn's own middleware would believe any
                              # X-Forwarded-For from 127.0.0.1, and cost every request a pass over its headers
                              "proxy_headers": False,
                              "timeout_graceful_shutdown": 30, "h11_max_incomplete_event_size": cfg.proxy.max_header_bytes,
                              # one server protocol in every mode: heads bounded in size and time
                              "http": functools.partial(EdgeHttpProtocol, limits=Limits(
                                  header_timeout=cfg.proxy.header_timeout_seconds,
                                  body_timeout=cfg.proxy.body_timeout_seconds,
                                  max_connections=_connection_cap(cfg.proxy.max_client_connections),
                                  max_per_address=cfg.proxy.max_connections_per_address,
                                  exempt=cfg.quota.trusted_proxies))}
    console = _console_url(cfg)
    if cfg.workers <= 1:
        from manager.app import create_app

        print(f"toolserver-manager {cfg.version}: http://{cfg.host}:{cfg.port}  "
              f"(manager_id={cfg.manager_id}, replica_id={cfg.replica_id})", file=sys.stderr, flush=True)
        if console:
            print(f"toolserver-manager console: {console}/ui/", file=sys.stderr, flush=True)
        config = uvicorn.Config(create_app(cfg), **common)
        server = _Server(config)
        # uvicorn shuts down gracefully on Ctrl-C, then raises SIGINT again for its caller: here that
        # is only a KeyboardInterrupt traceback after a clean stop
        with contextlib.suppress(KeyboardInterrupt):
            server.run(sockets=_sockets(config, cfg))
        return
    # several workers: each is its own replica; metrics aggregate through a shared directory
    import json

    mpdir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="tsm-prom-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = mpdir
    if ns.config:
        os.environ["TSM_CONFIG"] = ns.config
    overrides = _overrides(ns)
    overrides.pop("workers", None)
    os.environ["TSM_CLI_OVERRIDES"] = json.dumps(overrides)
    print(f"toolserver-manager {cfg.version}: http://{cfg.host}:{cfg.port}  ({cfg.workers} workers, "
          f"manager_id={cfg.manager_id})", file=sys.stderr, flush=True)
    if console:
        print(f"toolserver-manager console: {console}/ui/", file=sys.stderr, flush=True)
    try:
        config = uvicorn.Config("manager.main:app_factory", factory=True, workers=cfg.workers, **common)
        Multiprocess(config, sockets=_sockets(config, cfg)).run()
    finally:
        shutil.rmtree(mpdir, ignore_errors=True)


def _console_url(cfg: Config) -> str:
    """Where the console listens, or "" when it is off (no admin token, or admin.console false)."""
    if not cfg.admin.console or not cfg.admin_token:
        return ""
    return f"http://{cfg.admin.console_host or cfg.host}:{cfg.admin.console_port}"


def _sockets(config: uvicorn.Config, cfg: Config) -> list[socket.socket]:
    """The proxy's listening socket and, when the console is on, the console's: one process
    serves both, and each request is told apart by the port it came to (manager/entry.py)."""
    socks = [config.bind_socket()]
    if _console_url(cfg):
        # bound here, not by a second uvicorn.Config: making one resets logging to uvicorn's own
        host = cfg.admin.console_host or cfg.host
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, cfg.admin.console_port))
        except OSError as exc:
            sock.close()
            print(f"toolserver-manager: cannot listen on {host}:{cfg.admin.console_port} "
                  f"(admin.console_port): {exc.strerror}", file=sys.stderr)
            sys.exit(1)
        sock.set_inheritable(True)
        socks.append(sock)
    return socks


if __name__ == "__main__":
    main()
