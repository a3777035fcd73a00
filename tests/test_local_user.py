"""A local unprivileged user (``nobody``) of the host where a manager runs: it must not read or
write the store, obtain any node's secret (from Redis, files or /proc) or redirect a session's
traffic. Each attack runs as that user with ``setpriv``, against the real manager and Redis."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from urllib.parse import urlsplit

import docker
import httpx
import redis

from testing import redis_env
from tests.conftest import ADMIN_TOKEN, REDIS_URL, wait_for
from tests.test_isolation import node_secret

AS_NOBODY = ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups", "--"]
STORE = urlsplit(REDIS_URL)
FAST = {"proxy": {"address_cache_seconds": 0}}  # every request reads the record: the attacker's best case


def as_nobody(*argv: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return subprocess.run([*AS_NOBODY, *argv], capture_output=True, text=True, timeout=timeout, **kw)


def nobody_redis(*cmd: str) -> str:
    """redis-cli as nobody against the manager's Redis, every password it could find offered
    (none: it cannot read the root-only file); its output, errors included."""
    out = as_nobody("redis-cli", "-h", STORE.hostname or "127.0.0.1", "-p", str(STORE.port or 6379),
                    "-n", STORE.path.strip("/") or "0", *cmd)
    return out.stdout + out.stderr


def new_session(url: str) -> tuple[httpx.Client, str]:
    c = httpx.Client(base_url=url, timeout=60)
    r = c.post("/get_cookie")
    assert r.status_code == 200, r.text
    return c, r.cookies["node_id"]


def test_local_user_cannot_read_or_write_the_store(start_manager, prefix: str, redis_client: redis.Redis) -> None:
    m = start_manager()
    _, node_id = new_session(m.url)
    key = f"{prefix}:node:{node_id}"
    assert redis_client.exists(key)
    # reading: no key, no record, no field
    for cmd in (["--scan", "--pattern", f"{prefix}:*"], ["hgetall", key], ["keys", "*"]):
        out = nobody_redis(*cmd)
        assert node_id not in out and "NOAUTH" in out, (cmd, out)
    # writing: refused, and the record is as it was
    before = redis_client.hgetall(key)
    out = nobody_redis("hset", key, "host", "127.0.0.1", "port", "1")
    assert "NOAUTH" in out, out
    assert redis_client.hgetall(key) == before
    # the password is in nothing nobody can read: its file, Redis's config, any command line
    for path in (redis_env.PASSWORD_FILE, redis_env.STATE / f"redis-{redis_env.PORT}.conf"):
        got = as_nobody("cat", str(path))
        assert got.returncode != 0 and "Permission denied" in got.stderr, (path, got)
    cmdlines = as_nobody("sh", "-c", "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '").stdout
    assert redis_env.password() not in cmdlines
    # nor in what the manager shows or logs (its redis.url carries it here)
    assert redis_env.password() in m.cfg["redis"]["url"]
    shown = httpx.get(m.url + "/admin/config", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    assert shown.status_code == 200 and ":***@" in shown.json()["redis"]["url"]
    assert redis_env.password() not in shown.text and redis_env.password() not in m.logs()


# what nobody runs to find a secret: every /proc environ and command line it can open, every file
# under the places a secret could be left (state dir, engine's dir, /run, /tmp, logs)
SEARCH = textwrap.dedent("""
    import glob, os, sys
    needles = [sys.stdin.readline().strip().encode()]  # not in argv: our own cmdline would match
    found = []
    for path in glob.glob('/proc/[0-9]*/environ') + glob.glob('/proc/[0-9]*/cmdline'):
        try:
            data = open(path, 'rb').read()
        except OSError:
            continue
        found += [path for n in needles if n in data]
    for top in ('/var/lib/toolserver-manager', '/var/lib/docker', '/run', '/tmp', '/dev/shm', '/var/log'):
        for root, dirs, files in os.walk(top):
            for name in files:
                p = os.path.join(root, name)
                try:
                    if os.path.getsize(p) > 8 << 20:
                        continue
                    data = open(p, 'rb').read()
                except OSError:
                    continue
                found += [p for n in needles if n in data]
    print('\\n'.join(sorted(set(found))))
""")


def test_local_user_cannot_obtain_a_node_secret(start_manager, prefix: str, redis_client: redis.Redis,
                                               docker_client: docker.DockerClient) -> None:
    m = start_manager()
    _, node_id = new_session(m.url)
    secret = node_secret(docker_client, node_id)  # root reads it from the engine: what nobody must not learn
    assert len(secret) >= 32
    # Redis itself holds no node secret in clear, whoever reads it
    record = redis_client.hgetall(f"{prefix}:node:{node_id}")
    assert record and not any(secret.encode() in v for v in record.values()), record
    dump = b"".join(redis_client.dump(k) or b"" for k in redis_client.scan_iter(match=f"{prefix}:*"))
    assert secret.encode() not in dump
    # nobody: not from Redis
    out = nobody_redis("hget", f"{prefix}:node:{node_id}", "secret")
    assert secret not in out, out
    # nor from any file or process it can open
    found = as_nobody(sys.executable if sys.executable.startswith("/usr/") else "/usr/bin/python3", "-c", SEARCH,
                      timeout=300, input=secret + "\n")
    assert found.returncode == 0, found.stderr[-2000:]
    assert found.stdout.strip() == "", f"nobody read the node's secret from: {found.stdout}"


LISTENER = textwrap.dedent("""
    import socket, sys
    s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(16)
    print(s.getsockname()[1], flush=True)
    while True:
        c, _ = s.accept()
        c.settimeout(2)
        data = b''
        try:
            while b'\\r\\n\\r\\n' not in data:
                chunk = c.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
        print(repr(data), flush=True)
        c.sendall(b'HTTP/1.1 200 OK\\r\\ncontent-type: application/json\\r\\ncontent-length: 12\\r\\n\\r\\n"hijacked!!"')
        c.close()
""")


def test_local_user_cannot_redirect_a_session(start_manager, prefix: str, redis_client: redis.Redis,
                                             docker_client: docker.DockerClient) -> None:
    m = start_manager(**FAST)
    b, b_id = new_session(m.url)
    _, c_id = new_session(m.url)  # another session: its container must not get b's traffic either
    key = f"{prefix}:node:{b_id}"
    listener = subprocess.Popen([*AS_NOBODY, "/usr/bin/python3", "-c", LISTENER], stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout is not None
        port = int(listener.stdout.readline())
        # as nobody: the record cannot be rewritten at all
        out = nobody_redis("hset", key, "host", "127.0.0.1", "port", str(port))
        assert "NOAUTH" in out, out
        # and were it rewritten anyway (a Redis writer: here root, as a stand-in), the manager sends
        # the request only where the engine says b's node is
        redis_client.hset(key, mapping={"host": "127.0.0.1", "port": str(port)})
        for _ in range(3):
            r = b.post("/")
            assert r.status_code == 200 and "hijacked" not in r.text, r.text
        # the record names another session's container (a container id is Redis data too)
        c_cid = redis_client.hget(f"{prefix}:node:{c_id}", "container_id").decode()
        c_host = docker_client.api.inspect_container(c_cid)["NetworkSettings"]["Networks"]
        (c_net,) = c_host.values()
        redis_client.hset(key, mapping={"container_id": c_cid, "host": c_net["IPAddress"], "port": "31942"})
        r = b.post("/")
        assert r.status_code == 503 and "does not confirm" in r.json()["detail"], r.text
    finally:
        listener.kill()
        seen, _ = listener.communicate(timeout=10)
    assert seen.strip() == "", f"the listener of nobody received: {seen[:2000]}"


def test_sessions_made_before_the_key_keep_working_then_lose_their_clear_secret(
        start_manager, prefix: str, redis_client: redis.Redis, docker_client: docker.DockerClient) -> None:
    """A rolling upgrade: a session made by a replica without node_secret_key (its secret random,
    in Redis) is served by replicas with the key, and its next container gets the derived one."""
    old = start_manager("old", cluster={"node_secret_key": ""})
    c, node_id = new_session(old.url)
    key = f"{prefix}:node:{node_id}"
    clear = redis_client.hget(key, "secret")
    assert clear and clear.decode() == node_secret(docker_client, node_id)
    old.stop()
    new = start_manager("new")
    c.base_url = httpx.URL(new.url)
    assert c.post("/").status_code == 200  # the clear secret is used as it is
    # its container gone, the session comes back on its workspace with a derived secret
    cid = redis_client.hget(key, "container_id").decode()
    docker_client.api.remove_container(cid, force=True)
    assert wait_for(lambda: c.post("/").status_code == 200, timeout=60, what="the session back")
    new_cid = redis_client.hget(key, "container_id").decode()
    assert new_cid != cid and redis_client.hget(key, "secret") == b""
    assert node_secret(docker_client, new_cid) != clear.decode()


def test_a_node_of_another_manager_id_gets_its_secret_only_where_its_owner_confirms(
        start_manager, manager_id: str, manager_id_b: str, prefix: str, redis_client: redis.Redis) -> None:
    """Replica a proxies straight to a node that manager_id_b owns (another engine, as far as a
    knows): b's engine, asked through b, says where it is; a rewritten record does not."""
    local = {"cluster": {"placement": "local"}, **FAST}
    a = start_manager("a", **local)
    b = start_manager("b", mid=manager_id_b, **local)
    c, node_id = new_session(b.url)
    c.base_url = httpx.URL(a.url)
    assert c.post("/").status_code == 200  # a reaches b's node (and asked b where it is)
    listener = subprocess.Popen([*AS_NOBODY, "/usr/bin/python3", "-c", LISTENER], stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout is not None
        port = int(listener.stdout.readline())
        redis_client.hset(f"{prefix}:node:{node_id}", mapping={"host": "127.0.0.1", "port": str(port)})
        for _ in range(3):
            r = c.post("/")
            assert r.status_code == 200 and "hijacked" not in r.text, r.text
    finally:
        listener.kill()
        seen, _ = listener.communicate(timeout=10)
    assert seen.strip() == "", f"the listener of nobody received: {seen[:2000]}"
