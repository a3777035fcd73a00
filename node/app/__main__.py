"""Entry point: ``python3 -m app`` serves the node on NODE_HOST:NODE_PORT (0.0.0.0:31942).

uvicorn runs programmatically with uvloop, httptools and websockets (uvicorn's sans-I/O protocol on
the websockets library, imported at the first WebSocket upgrade), no access log and no logging
dictConfig: everything not needed to accept the first HTTP request is imported later. Once listening, the node logs how long after the process
start that happened. SIGTERM/SIGINT stop it within about a second; the exit status is then 0.
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
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                age = _seconds_since_process_start()
                log.info("node ready on %s:%d, workspace %s%s", config.HOST, config.PORT,
                         config.WORKSPACE, "" if age is None else f", listening {age * 1000:.0f} ms "
                         "after process start")

        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
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
