"""``toolserver-checker``: the checker alone, for deployments that separate it from the manager."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time

import httpx

from checker.service import Checker
from nodeops.context import NodeOps
from shared import __version__
from shared.config import Config, load_config
from shared.engines import open_backend
from shared.errors import ConfigError
from shared.logs import setup_logging
from shared.models import ReplicaInfo
from shared.store import Store


async def _run(cfg: Config) -> None:
    store = Store.open(cfg)
    backend = open_backend(cfg)
    await backend.prepare(cfg.manager_id)
    async with httpx.AsyncClient(trust_env=False) as http:
        # the same node operations a manager runs, so pooled nodes are created exactly as sessions are
        ops = NodeOps(cfg=cfg, store=store, backend=backend, http=http,
                      replica=ReplicaInfo(replica_id=cfg.replica_id, manager_id=cfg.manager_id, url="",
                                          version=__version__, started_at=time.time()))
        checker = Checker(ops)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(checker.stop()))
        try:
            await checker.run()
        finally:
            await ops.close_http()
    await backend.close()
    await store.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="toolserver-checker", description=__doc__)
    p.add_argument("--config", "-c", help="YAML config file (default: $TSM_CONFIG)")
    p.add_argument("--manager-id", help="config: manager_id")
    ns = p.parse_args(argv)
    try:
        cfg = load_config(ns.config, overrides={"manager_id": ns.manager_id} if ns.manager_id else None)
    except ConfigError as exc:
        print(f"toolserver-checker: {exc.detail}", file=sys.stderr)
        sys.exit(2)
    setup_logging(cfg.logger_level, cfg.log_format, cfg.replica_id, cfg.manager_id)
    asyncio.run(_run(cfg))


if __name__ == "__main__":
    main()
