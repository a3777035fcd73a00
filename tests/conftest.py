"""Fixtures on the real parts: the Redis and dockerd that scripts/test.sh started, manager
replicas as real processes, and cleanup of every container by the project's label."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
import redis
import redis.asyncio as aioredis

from shared.config import deep_merge
from shared.keys import Keys
from shared.store import Store
from testing import machine
from testing.harness import ManagerProc, PrivateRedis, remove_project_objects, report
from testing.hosts import PrivateEngine
from testing.redis_cluster import RedisCluster
from testing.redis_env import redis_url

ROOT = Path(__file__).resolve().parents[1]
REDIS_URL = redis_url()  # the project's own Redis, with its password (never the machine's 6379)
LABEL = "toolserver-manager.manager_id"
# a work tree can build and test its own node image beside others (node/build.sh reads it too)
NODE_IMAGE = os.environ.get("TSM_NODE_IMAGE", "toolserver-node:latest")
INTERNAL_TOKEN = "test-internal-token"
NODE_SECRET_KEY = "test-node-secret-key"  # node secrets derived, never in Redis (shared/nodesecret.py)
ADMIN_TOKEN = "test-admin-token"


@pytest.fixture(scope="session")
def redis_client() -> Iterator[redis.Redis]:
    r = redis.Redis.from_url(REDIS_URL)
    r.ping()  # scripts/test.sh starts Redis; a failure here is a real failure, not a skip
    yield r
    r.close()


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    client = docker.DockerClient(base_url="unix:///var/run/docker.sock", version="1.41")
    client.ping()
    client.images.get(NODE_IMAGE)
    yield client
    # nothing a test of this session made may outlive it
    for mid in sorted(machine.RUN.manager_ids):
        remove_containers(client, mid)
    client.close()


MACHINE_REDIS_URL = "redis://127.0.0.1:6379/0"  # the machine's own Redis, if it has one: never used, only watched


def _uses_services(items: list[pytest.Item]) -> bool:
    """A run of unit tests alone touches no service and needs none."""
    return not all(Path(item.path).parent.name == "unit" for item in items)


class MachineCheck:
    """The end-of-run check (testing/machine.py) over the whole run: the machine's dockerd (pid),
    its Redis and the project's (run_id) and /etc/docker/daemon.json (sha256) are as they were,
    and nothing the run made is left. Run by the process that runs the session: pytest itself, or
    with test files side by side (pytest-xdist) the controller, once every worker is done (a
    worker's end is not the run's: the firewall chains it would take away are in use by others)."""

    def __init__(self) -> None:
        self.urls = [MACHINE_REDIS_URL, REDIS_URL]
        self.before: machine.Snapshot | None = None
        self.error = ""
        self.used = False  # whether any test that uses the services ran
        self.basetemps: list[Path] = []

    def start(self) -> None:
        try:
            client = docker.DockerClient(base_url="unix:///var/run/docker.sock", version="1.41")
            try:
                self.before = machine.snapshot(client, self.urls)
            finally:
                client.close()
        except Exception as exc:  # unit tests alone need no engine: said only if others ran
            self.error = f"{type(exc).__name__}: {exc}"

    def finish(self) -> list[str]:
        """What the run changed or left behind (empty: nothing)."""
        if self.before is None:
            return [f"the machine could not be read at the start of the run ({self.error})"]
        if not any(line.startswith("-N TSM-") for line in self.before.firewall):
            from shared import firewall

            with contextlib.suppress(firewall.NoPrivilege, firewall.FirewallError):
                firewall.remove()
        client = docker.DockerClient(base_url="unix:///var/run/docker.sock", version="1.41")
        try:
            after = machine.snapshot(client, self.urls, settle=True)
        finally:
            client.close()
        found: list[str] = []
        for tmp in self.basetemps or [None]:
            found += [f for f in machine.problems(self.before, after, tmp) if f not in found]
        if not found:
            report(f"end-of-run check passed: the machine's dockerd still pid {after.dockerd_pid}, "
                   f"{len(self.urls)} Redis run_ids and {machine.DAEMON_JSON} ({after.daemon_json[:12]}) unchanged, "
                   "nothing left behind")
        return found


CHECK = MachineCheck()
WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # set in pytest-xdist's workers only


@pytest.fixture(scope="session", autouse=True)
def machine_untouched(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The end-of-run check (MachineCheck), in a run without workers. Autouse and first, so it is
    torn down after every other fixture."""
    if not _uses_services(request.session.items):
        yield
        return
    if WORKER:  # the controller checks, once all workers are done (pytest_testnodedown below)
        request.config.workeroutput["uses_services"] = True  # type: ignore[attr-defined]
        yield
        return
    CHECK.used = True
    CHECK.basetemps = [tmp_path_factory.getbasetemp()]
    CHECK.start()
    yield
    found = CHECK.finish()
    assert not found, "the run changed the machine or left things behind:\n- " + "\n- ".join(found)


def _is_controller(config: pytest.Config) -> bool:
    return getattr(config.option, "dist", "no") != "no" and not hasattr(config, "workerinput")


def pytest_sessionstart(session: pytest.Session) -> None:
    if _is_controller(session.config):
        CHECK.start()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """A worker is done (xdist's controller): what it made and measured joins the run's."""
    from testing.harness import FIGURES

    out = getattr(node, "workeroutput", {})
    CHECK.used |= bool(out.get("uses_services"))
    for kind in ("manager_ids", "images", "host_tags"):
        getattr(machine.RUN, kind).update(out.get(kind, ()))
    if out.get("basetemp"):
        CHECK.basetemps.append(Path(out["basetemp"]))
    FIGURES.extend(out.get("figures", ()))


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    if not WORKER and getattr(config, "cache", None) is not None and _file_seconds:
        config.cache.set(FILE_SECONDS, {**config.cache.get(FILE_SECONDS, {}),
                                        **{k: round(v, 1) for k, v in _file_seconds.items()}})
    if WORKER and hasattr(config, "workeroutput"):  # to the controller (pytest_testnodedown)
        from testing.harness import FIGURES

        config.workeroutput.update({kind: sorted(getattr(machine.RUN, kind))
                                    for kind in ("manager_ids", "images", "host_tags")})
        config.workeroutput["figures"] = list(FIGURES)
        with contextlib.suppress(Exception):
            config.workeroutput["basetemp"] = str(config._tmp_path_factory.getbasetemp())  # type: ignore[attr-defined]
    elif _is_controller(config) and CHECK.used:
        found = CHECK.finish()
        if found:
            tr = config.pluginmanager.get_plugin("terminalreporter")
            text = "the run changed the machine or left things behind:\n- " + "\n- ".join(found)
            if tr is not None:
                tr.ensure_newline()
                tr.section("END-OF-RUN CHECK FAILED", sep="!", red=True, bold=True)
                tr.write_line(text)
            else:
                sys.stderr.write(text + "\n")
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


# Seconds each test file takes, for the order of a run with workers: the longest files start
# first, so that no long file starts last while the other workers idle. Measured by each run into
# pytest's cache (FILE_SECONDS); these are for a tree the cache has not seen (a fresh clone), from
# full run f6d (files of 8 s or more; only their order matters); a file not here counts as short.
FILE_SECONDS = "toolserver-manager/file-seconds"
KNOWN_SECONDS: dict[str, float] = {
    # run f6d (2026-12-07): a later run, 4 workers, a quiet 2-CPU machine, 12 m 51 s of pytest
    "tests/test_kubernetes.py": 294,
    "tests/test_fork_faults.py": 196,
    "tests/test_egress_enforce.py": 166,
    "tests/test_isolation.py": 138,
    "tests/test_cluster.py": 137,
    "tests/test_hostile_node.py": 123,
    "tests/test_tiers.py": 113,
    "tests/test_http_edge.py": 110,
    "tests/test_operations.py": 108,
    "tests/test_sessions.py": 104,
    "tests/test_creation_queue.py": 103,
    "tests/test_store_load.py": 102,
    "tests/test_mcp.py": 89,
    "tests/test_checker.py": 88,
    "tests/test_console.py": 88,
    "tests/test_differential.py": 82,
    "tests/test_local_user.py": 73,
    "tests/test_multihost.py": 72,
    "tests/test_egress_tls.py": 63,
    "tests/test_redis_cluster.py": 57,
    "tests/test_fork_reflink.py": 50,
    "tests/test_credentials.py": 49,
    "tests/node/test_node_image.py": 48,
    "tests/test_cli.py": 40,
    "tests/test_client_counts.py": 36,
    "tests/test_images.py": 33,
    "tests/test_fork_multihost.py": 32,
    "tests/test_fork.py": 32,
    "tests/test_snapshots.py": 32,
    "tests/test_balancer.py": 31,
    "tests/test_websocket.py": 29,
    "tests/test_event_streams.py": 29,
    "tests/test_egress_multihost.py": 25,
    "tests/test_client.py": 24,
    "tests/test_fork_client.py": 23,
    "tests/test_sentinel.py": 20,
    "tests/test_fuzz.py": 19,
    "tests/test_prometheus.py": 19,
    "tests/test_redis_outage.py": 19,
    "tests/test_helm.py": 17,
    "tests/test_engine_events.py": 17,
    "tests/test_replica_grace.py": 15,
    "tests/test_fork_console.py": 12,
    "tests/test_egress.py": 10,
    "tests/test_checker_standalone.py": 8,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not WORKER:
        return
    past = {**KNOWN_SECONDS, **(config.cache.get(FILE_SECONDS, {}) if getattr(config, "cache", None) else {})}
    first: dict[str, int] = {}
    for i, item in enumerate(items):
        first.setdefault(item.nodeid.split("::")[0], i)
    index = {id(item): i for i, item in enumerate(items)}

    def key(item: pytest.Item) -> tuple[float, int, int]:
        path = item.nodeid.split("::")[0]
        return -float(past.get(path, 0)), first[path], index[id(item)]

    items.sort(key=key)


_file_seconds: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not WORKER:  # the controller sees every worker's reports too
        path = report.nodeid.split("::")[0]
        _file_seconds[path] = _file_seconds.get(path, 0.0) + report.duration


LOCK_DIR = Path("/run/lock") if Path("/run/lock").is_dir() else Path("/tmp")


@pytest.fixture(scope="module", autouse=True)
def machine_state_lock(request: pytest.FixtureRequest) -> Iterator[None]:
    """A file whose tests assert on machine-wide state that other files' tests change names it in a
    module-level ``LOCKS = {"name": "exclusive"}`` (the files that change it: ``"shared"``): its
    tests then run while no other file holding that name runs, in this run's workers or in another
    run on the machine (an flock for the module's whole time)."""
    locks = getattr(request.module, "LOCKS", {})
    with contextlib.ExitStack() as held:
        for name, mode in sorted(locks.items()):
            f = held.enter_context(open(LOCK_DIR / f"toolserver-manager-test-{name}.lock", "a"))
            fcntl.flock(f, fcntl.LOCK_EX if mode == "exclusive" else fcntl.LOCK_SH)
        yield


@pytest.fixture
def prefix(redis_client: redis.Redis) -> Iterator[str]:
    p = f"tsmtest-{uuid.uuid4().hex[:8]}"
    yield p
    keys = list(redis_client.scan_iter(match=f"{p}:*", count=1000))
    if keys:
        redis_client.delete(*keys)


@pytest.fixture
async def store(prefix: str) -> Any:
    """The project's Store on the test Redis, under this test's own key prefix."""
    r = aioredis.Redis.from_url(REDIS_URL)
    yield Store(r, Keys(prefix))
    await r.aclose()


@pytest.fixture
def manager_id(docker_client: docker.DockerClient) -> Iterator[str]:
    mid = f"test-{uuid.uuid4().hex[:8]}"
    machine.RUN.manager_ids.add(mid)
    yield mid
    remove_containers(docker_client, mid)


@pytest.fixture
def manager_id_b(docker_client: docker.DockerClient) -> Iterator[str]:
    """A second manager_id on this engine, cleaned up like the first. Name it before start_manager
    in a test's arguments, so that the replicas stop before its objects are removed. (The run's
    manager_ids are kept in testing.machine.RUN, not here: pytest loads this file as `conftest`,
    and a test's `from tests.conftest import ...` gets a second copy of the module.)"""
    mid = f"test-{uuid.uuid4().hex[:8]}"
    machine.RUN.manager_ids.add(mid)
    yield mid
    remove_containers(docker_client, mid)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A redis-server of this test's own, for faults (kill it, start it again on its port)."""
    r = PrivateRedis(tmp_path).start()
    yield r
    r.kill()


@pytest.fixture(scope="session")
def _private_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateEngine]:
    # one per run, made on first use: a namespace, a dockerd and the node image cost seconds
    eng = PrivateEngine(tmp_path_factory.mktemp("private-engine"), NODE_IMAGE).start()
    try:
        yield eng
    finally:
        eng.close()


@pytest.fixture
def private_engine(_private_engine: PrivateEngine, manager_id: str) -> Iterator[PrivateEngine]:
    """A dockerd of the run's own (testing.hosts.PrivateEngine) for faults: stopped, restarted,
    runtimes registered. Name it before start_manager so that replicas stop before its clean-up."""
    _private_engine.ensure_running()
    yield _private_engine
    _private_engine.ensure_running()
    client = _private_engine.client()
    try:
        remove_project_objects(client, manager_id)
    finally:
        client.close()


def remove_containers(client: docker.DockerClient, mid: str) -> None:
    """Everything a manager_id made on the engine: containers, workspaces, the node network."""
    remove_project_objects(client, mid)


def project_containers(client: docker.DockerClient, mid: str) -> list[Any]:
    # sparse: no inspect per container, which races with removals in progress
    return client.containers.list(all=True, sparse=True, filters={"label": f"{LABEL}={mid}"})


def base_config(prefix: str, manager_id: str, **over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "manager_id": manager_id,
        "log_format": "logfmt",
        "logger_level": "INFO",
        "redis": {"url": REDIS_URL, "key_prefix": prefix},
        "node": {"creation_wait_seconds": 20, "idle_grace_seconds": 0, "stop_timeout_seconds": 2,
                 "creation_kwargs": {"image": NODE_IMAGE, "init": True, "mem_limit": "512m",
                                     "labels": {"toolserver-manager.test": "1"}}},
        "checker": {"interval_seconds": 0.5, "lease_ttl_seconds": 3, "start_jitter_seconds": 0.2},
        "cluster": {"internal_token": INTERNAL_TOKEN, "node_secret_key": NODE_SECRET_KEY, "heartbeat_seconds": 0.5,
                    "replica_ttl_seconds": 2},
        "admin": {"token": ADMIN_TOKEN},
        # every test's client is 127.0.0.1, one anonymous client: no per-client limit unless a test sets one
        "quota": {"per_client": 0},
    }
    return deep_merge(cfg, over)


@pytest.fixture
def managers(tmp_path: Path, request: pytest.FixtureRequest, prefix: str,
             manager_id: str) -> Iterator[list[ManagerProc]]:
    """A list to append started ManagerProcs to; all are stopped at teardown (logs shown on failure).

    It depends on prefix and manager_id so that the replicas stop before their keys and
    containers are cleaned up (a replica still running would write them again)."""
    procs: list[ManagerProc] = []
    yield procs
    for m in procs:
        m.stop()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for m in procs:
            sys.stderr.write(f"\n----- log of {m.replica_id} -----\n{m.logs()[-6000:]}\n")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The figures tests measured (testing.harness.report), e.g. the Sentinel failover's recovery."""
    from testing.harness import FIGURES

    if FIGURES:
        terminalreporter.section("figures measured by the tests")
        for line in FIGURES:
            terminalreporter.write_line(line)


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture
def start_manager(managers: list[ManagerProc], tmp_path: Path, prefix: str, manager_id: str):  # type: ignore[no-untyped-def]
    """Start a replica of this test's manager_id (or another) with config overrides."""

    def start(name: str = "m", mid: str | None = None, wait: bool = True, **over: Any) -> ManagerProc:
        m = ManagerProc(base_config(prefix, mid or manager_id, **over), tmp_path, name)
        managers.append(m)
        return m.start(wait=wait)

    return start


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    """Six redis-server processes in cluster mode (three primaries), one set per test file."""
    c = RedisCluster().start()
    try:
        yield c
    finally:
        c.close()


def wait_for(pred: Any, timeout: float = 20, interval: float = 0.1, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


async def until(pred: Any, timeout: float = 20, interval: float = 0.1, what: str = "condition") -> Any:
    """wait_for for a test on the event loop: pred is polled without blocking the loop; it may be
    sync or return an awaitable."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
