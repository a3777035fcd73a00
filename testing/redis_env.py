"""The project's own Redis, the one place tests, benchmarks and harnesses get its URL from.

scripts/services.sh start-redis runs it on 127.0.0.1:$TSM_REDIS_PORT (6380) with the password in a
root-only file of the state dir; the machine's Redis on 6379 is someone else's and is never used.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STATE = Path(os.environ.get("TSM_STATE_DIR", "/var/lib/toolserver-manager"))
PORT = int(os.environ.get("TSM_REDIS_PORT", "6380"))
PASSWORD_FILE = STATE / "redis-password"


def password() -> str:
    """The project Redis's password (made by scripts/services.sh when missing)."""
    if not PASSWORD_FILE.exists():
        subprocess.run(["bash", str(ROOT / "scripts/services.sh"), "redis-password"], check=True,
                       stdout=subprocess.DEVNULL)
    return PASSWORD_FILE.read_text().strip()


def redis_url(db: int = 0) -> str:
    """``redis://:<password>@127.0.0.1:<port>/<db>`` of the project's Redis (``TSM_TEST_REDIS_URL``,
    when set, names another one; its database is replaced by db)."""
    given = os.environ.get("TSM_TEST_REDIS_URL")
    if given:
        return f"{given.rsplit('/', 1)[0]}/{db}"
    return private_url("127.0.0.1", PORT, db)


def private_url(host: str, port: int, db: int = 0) -> str:
    """The URL of a Redis started with ``private_server_args`` (or of the project's)."""
    return f"redis://:{password()}@{host}:{port}/{db}"


def private_server_args(port: int, bind: str = "127.0.0.1") -> list[str]:
    """redis-server arguments for a private server of a test or benchmark (its own port) that
    requires the project's password, so that it is no way in either. The password is in a
    root-only config file, never on the command line, which every local user can read."""
    conf = STATE / "redis-auth.conf"
    # written whole under another name, then renamed: a server starting meanwhile in another test
    # process never reads it half-written (an empty file would start it without a password)
    tmp = conf.with_name(f".{conf.name}.{os.getpid()}")
    old = os.umask(0o077)
    try:
        tmp.write_text(f"requirepass {password()}\n")
    finally:
        os.umask(old)
    os.replace(tmp, conf)
    return [str(conf), "--bind", bind, "--port", str(port)]
