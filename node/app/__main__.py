"""Entry point: ``python3 -m app`` serves the node on NODE_HOST:NODE_PORT (0.0.0.0:31942).

uvicorn runs programmatically with uvloop, httptools and websockets (uvicorn's sans-I/O protocol on
the websockets library, imported at the first WebSocket upgrade), no access log and no logging
dictConfig: everything not needed to accept the first HTTP request is imported later. Once listening, the node logs how long after the process
start that happened. SIGTERM/SIGINT stop it within about a second; the exit status is then 0.
An idle node wakes once a second (uvicorn's own loop wakes ten times).
"""

import os
import sys
import time


def _seconds_since_process_start():
    """Age of this process from /proc (the kernel's clock-tick resolution, usually 10 ms)."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _import_uvicorn():
    """Import uvicorn's Config and Server without running ``uvicorn/__init__`` (which loads its CLI:
    click, reload supervisors; about 15 ms of start-up). Falls back to the plain import."""
    if "uvicorn" not in sys.modules:
        try:
            import importlib.util
            import types

            spec = importlib.util.find_spec("uvicorn")
            stub = types.ModuleType("uvicorn")
            stub.__spec__, stub.__file__ = spec, spec.origin
            stub.__path__ = list(spec.submodule_search_locations)
            sys.modules["uvicorn"] = stub
            try:
                from uvicorn.config import Config
                from uvicorn.server import Server
            except Exception:
                for name in [m for m in sys.modules if m == "uvicorn" or m.startswith("uvicorn.")]:
                    del sys.modules[name]
                raise
            stub.Config, stub.Server, stub.__version__ = Config, Server, "lean"
            return Config, Server
        except Exception:
            pass
    import uvicorn

    return uvicorn.Config, uvicorn.Server


def _websocket_protocol(**kwargs):
    """uvicorn's WebSocket protocol (websockets, sans-I/O), imported on the first upgrade only."""
    global _WS_CLASS
    if _WS_CLASS is None:
        from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

        _WS_CLASS = WebSocketsSansIOProtocol
    return _WS_CLASS(**kwargs)


_WS_CLASS = None
TICK_SECONDS = 1.0  # the server's main loop: the Date header's resolution (uvicorn ticks at 0.1 s)


def main() -> int:
    import logging

    from . import privileges

    privileges.drop_to_server()  # before anything else runs (gVisor: see entrypoint.sh)

    from . import config

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("uvicorn", "app"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(config.LOG_LEVEL)
        logger.propagate = False
    log = logging.getLogger("uvicorn.error")

    Config, Server = _import_uvicorn()

    from .server import app

    class NodeServer(Server):
        _wake = None

        async def main_loop(self):
            # uvicorn's loop ticks every 0.1 s for what changes once a second (the Date header) and
            # for the exit flag: 1.5 ms of CPU a second per idle node, a sixth of a core for a pool
            # of 100. Here it ticks once a second (every tick a date tick), and a signal wakes it at
            # once, so a stop is as prompt as before
            import asyncio

            self._wake = asyncio.Event()
            loop = asyncio.get_running_loop()
            self._wake_soon = lambda: loop.call_soon_threadsafe(self._wake.set)
            counter = 0
            while not await self.on_tick(counter):
                counter = (counter + 10) % 864000
                try:
                    await asyncio.wait_for(self._wake.wait(), TICK_SECONDS)
                except TimeoutError:
                    pass
                self._wake.clear()

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                age = _seconds_since_process_start()
                log.info("node ready on %s:%d, workspace %s%s", config.HOST, config.PORT,
                         config.WORKSPACE, "" if age is None else f", listening {age * 1000:.0f} ms "
                         "after process start")

        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            if self._wake is not None:  # the main loop waits up to a second: wake it now
                try:
                    self._wake_soon()
                except RuntimeError:  # the loop is already closed: nothing waits
                    pass
            # uvicorn re-raises the captured signal after a graceful stop; a stop we asked for is
            # a clean exit (status 0), not death by signal
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()

    server = NodeServer(Config(
        app, host=config.HOST, port=config.PORT, loop="uvloop", http="httptools", ws=_websocket_protocol,
        lifespan="on", access_log=False, log_config=None, proxy_headers=False, server_header=False,
        timeout_graceful_shutdown=config.GRACEFUL_SHUTDOWN, timeout_keep_alive=30,
    ))
    server.run()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # worker threads (a tool still waiting on the network, say) must not hold the exit
    os._exit(0 if server.started else 1)


if __name__ == "__main__":
    main()
