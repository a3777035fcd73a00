"""Config loading: YAML, environment overrides (typed, nested), XAgent's keys, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared import config
from shared.config import XAGENT_POST_PATHS, load_config
from shared.errors import ConfigError

XAGENT_MANAGER_YML = """
version: "0.2"
logger: "gunicorn.error"
logger_level: 20
builtin_monitor: True
node:
  creation_wait_seconds: 30
  idling_close_minutes: 30
  health_check: true
  health_check_interval: 1
  port: 31942
  creation_kwargs:
    image: "xagentteam/toolserver-node:latest"
    network: "tool-server-network"
    privileged: true
    detach: true
    volumes: ["toolserverconfig:/app/assets/config"]
  device_requests:
redirect_to_node_path:
  post: ["/", "/execute_tool", "/get_available_tools", "/get_json_schema_for_tools",
         "/get_json_schema_for_envs", "/retrieving_tools", "/register_new_tool", "/upload_file",
         "/download_file", "/download_workspace", "/get_workspace_structure"]
  get: ["/"]
"""


def test_xagent_manager_yml_is_accepted(tmp_path: Path) -> None:
    p = tmp_path / "manager.yml"
    p.write_text(XAGENT_MANAGER_YML)
    cfg = load_config(p, environ={})
    assert cfg.version == "0.2"
    assert cfg.engine.docker.creation_kwargs["privileged"] is True  # XAgent's node.creation_kwargs, moved
    assert cfg.redirect_to_node_path.post == XAGENT_POST_PATHS
    assert cfg.engine.docker.device_requests is None


NEW_SPELLING = """
engine:
  docker:
    host: unix:///run/other.sock
    threads: 3
    creation_kwargs: {image: "img:new", mem_limit: 2g}
    device_requests: [{count: 1}]
    runtime: runsc
"""
OLD_SPELLING = """
docker_host: unix:///run/other.sock
docker_threads: 3
node:
  creation_kwargs: {image: "img:new", mem_limit: 2g}
  device_requests: [{count: 1}]
  runtime: runsc
"""


@pytest.mark.parametrize("text", [NEW_SPELLING, OLD_SPELLING], ids=["new", "old"])
def test_docker_keys_are_read_in_either_spelling(tmp_path: Path, text: str) -> None:
    p = tmp_path / "manager.yml"
    p.write_text(text)
    d = load_config(p, environ={}).engine.docker
    assert (d.host, d.threads, d.creation_kwargs, d.device_requests, d.runtime) == (
        "unix:///run/other.sock", 3, {"image": "img:new", "mem_limit": "2g"}, [{"count": 1}], "runsc")


def test_an_old_key_is_named_once_in_the_log_with_its_new_one(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    p = tmp_path / "manager.yml"
    p.write_text(OLD_SPELLING)
    with caplog.at_level("WARNING", logger="shared.config"):
        load_config(p, environ={"TSM_DOCKER_HOST": "tcp://env:2375"})
    lines = sorted(r.getMessage() for r in caplog.records if r.name == "shared.config")
    assert lines == [
        "config_key_deprecated old=docker_host new=engine.docker.host",
        "config_key_deprecated old=docker_threads new=engine.docker.threads",
        "config_key_deprecated old=node.creation_kwargs new=engine.docker.creation_kwargs",
        "config_key_deprecated old=node.device_requests new=engine.docker.device_requests",
        "config_key_deprecated old=node.runtime new=engine.docker.runtime",
    ]
    caplog.clear()
    with caplog.at_level("WARNING", logger="shared.config"):
        load_config(None, environ={}, overrides={"engine": {"docker": {"host": "tcp://x:1"}}})
    assert [r for r in caplog.records if r.name == "shared.config"] == []


def test_an_old_key_beside_its_new_one_is_merged_over_it() -> None:
    # the chart's values.yaml gives the new key in full; an older values file adds the old one
    cfg = load_config(None, environ={"TSM_DOCKER_HOST": "tcp://old:1"}, overrides={
        "engine": {"docker": {"host": "tcp://new:1", "creation_kwargs": {"image": "a", "init": True}}},
        "node": {"creation_kwargs": {"image": "b"}}})
    assert cfg.engine.docker.host == "tcp://old:1"
    assert cfg.engine.docker.creation_kwargs == {"image": "b", "init": True}


def test_an_unknown_engine_kind_fails_naming_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"engine.kind must be one of docker, fake, not 'podman'"):
        load_config(None, environ={}, overrides={"engine": {"kind": "podman"}})


def test_env_overrides_are_typed_and_nested() -> None:
    cfg = load_config(None, environ={"builtin_monitor": "false", "TSM_NODE__IDLING_CLOSE_MINUTES": "5",
                                     "TSM_REDIS__URL": "redis://example:1/2", "TSM_PROXY__PATH_TIMEOUTS": "{/x: 3}",
                                     "TSM_STATE_DIR": "/ignored"})
    assert cfg.builtin_monitor is False
    assert cfg.node.idling_close_minutes == 5.0
    assert cfg.redis.url == "redis://example:1/2"
    assert cfg.proxy.path_timeouts == {"/x": 3.0}


def test_invalid_value_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"node\.port"):
        load_config(None, environ={"TSM_NODE__PORT": "not-a-port"})


def test_unknown_key_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "c.yml"
    p.write_text("node:\n  idling_close_minuts: 3\n")
    with pytest.raises(ConfigError, match="idling_close_minuts"):
        load_config(p, environ={})


def test_cross_field_rule(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="lease_ttl_seconds"):
        load_config(None, environ={}, overrides={"checker": {"lease_ttl_seconds": 1, "interval_seconds": 2}})


def test_redacted_hides_secrets() -> None:
    cfg = load_config(None, environ={}, overrides={"admin": {"token": "s3cret"}, "cluster": {"internal_token": "x"}})
    data = cfg.redacted()
    assert data["admin"]["token"] == "***" and data["cluster"]["internal_token"] == "***"
    assert "s3cret" not in repr(data)


def test_redis_password_is_redacted_and_read_from_its_file(tmp_path: Path) -> None:
    f = tmp_path / "redis-password"
    f.write_text("pw-from-file\n")
    cfg = load_config(None, environ={}, overrides={"redis": {"url": "redis://tsm:pw-in-url@r:6380/2",
                                                             "password_file": str(f)}})
    assert cfg.redis_password == "pw-from-file"
    assert cfg.redacted()["redis"]["url"] == "redis://tsm:***@r:6380/2"
    assert "pw-in-url" not in repr(cfg.redacted()) and "pw-from-file" not in repr(cfg.redacted())
    bare = load_config(None, environ={}, overrides={"redis": {"url": "redis://:only-pw@r/0"}})
    assert bare.redis_password is None and bare.redacted()["redis"]["url"] == "redis://:***@r/0"


def test_default_redis_is_the_projects_own_with_its_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "redis-password"
    f.write_text("project-pw\n")
    monkeypatch.setattr(config, "PROJECT_REDIS_PASSWORD_FILE", str(f))
    cfg = load_config(None, environ={})
    assert cfg.redis.url == "redis://127.0.0.1:6380/0" and cfg.redis_password == "project-pw"
    # a Redis the user names keeps its own password (or none): the project's file is not sent there
    own = load_config(None, environ={}, overrides={"redis": {"url": "redis://:url-pw@other:6379/0"}})
    assert own.redis_password is None
    given = tmp_path / "given"
    given.write_text("given-pw")
    assert load_config(None, environ={"TSM_REDIS__PASSWORD_FILE": str(given)}).redis_password == "given-pw"
    f.unlink()  # no project Redis set up here: no password, as before
    assert load_config(None, environ={}).redis_password is None


def test_secret_from_file(tmp_path: Path) -> None:
    f = tmp_path / "tok"
    f.write_text("from-file\n")
    cfg = load_config(None, environ={}, overrides={"admin": {"token_file": str(f)}})
    assert cfg.admin_token == "from-file"


def test_tiers_can_be_turned_off_but_not_set_to_nonsense() -> None:
    cfg = load_config(environ={"TSM_NODE__TIERS__PAUSE_AFTER_SECONDS": "null", "TSM_NODE__IDLING_CLOSE_MINUTES": "null",
                               "TSM_NODE__TIERS__DELETE_AFTER_SECONDS": "604800"})
    assert cfg.node.tiers.pause_after_seconds is None and cfg.node.idling_close_minutes is None
    assert cfg.node.tiers.archive_after_seconds == 86400 and cfg.node.tiers.delete_after_seconds == 604800
    with pytest.raises(ConfigError, match=r"node\.tiers\.archive_after_seconds must be positive"):
        load_config(environ={"TSM_NODE__TIERS__ARCHIVE_AFTER_SECONDS": "0"})


def test_node_cap_past_one_bridge_is_refused_with_isolated_nodes() -> None:
    # a node network is one Linux bridge (1024 ports from 1): the 1024th node would fail to start
    with pytest.raises(ConfigError, match=r"cluster\.max_nodes_per_manager: 1024 is over the 1023 nodes"):
        load_config(None, environ={}, overrides={"cluster": {"max_nodes_per_manager": 1024}})
    load_config(None, environ={}, overrides={"cluster": {"max_nodes_per_manager": 1023}})
    load_config(None, environ={}, overrides={"cluster": {"max_nodes_per_manager": 5000},
                                             "node": {"network": {"isolated": False}}})


def test_node_cap_stays_within_what_the_engine_holds() -> None:
    from nodeops.capacity import within

    assert within(0, 1023) == 1023  # "unlimited" (-1, or a cap nothing derives: 0) is one bridge
    assert within(24, 1023) == 24
    assert within(5000, 1023) == 1023
    assert within(0, 0) == 0
    assert within(5000, 0) == 5000


def test_the_docker_engine_bounds_isolated_nodes_by_their_bridge() -> None:
    from shared.engines.docker.backend import DockerBackend

    assert DockerBackend(load_config(None, environ={})).max_nodes == 1023
    assert DockerBackend(load_config(None, environ={}, overrides={
        "node": {"network": {"isolated": False}}})).max_nodes == 0
