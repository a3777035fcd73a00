"""The end-of-run check's verdicts (testing/machine.py), from snapshots made by hand: each change to
the machine and each leftover of this run is named; another run's objects are not blamed on it."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest

from testing import machine


def _egress_table(manager_id: str) -> str:
    from shared.egress.nft import table_name
    from shared.firewall import BRIDGE_PREFIXES

    return table_name(BRIDGE_PREFIXES["open"] + hashlib.sha256(manager_id.encode()).hexdigest()[:10])


# the egress table of this run's manager_id's bridge, and of a manager running beside the suite
MY_TABLE, THEIR_TABLE = _egress_table("test-mine"), _egress_table("test-theirs")


def snap(**over: object) -> machine.Snapshot:
    base = machine.Snapshot(dockerd_pid="100", redis_run_ids={"redis://:pw@127.0.0.1:6380/0": "a", "redis://127.0.0.1:6379/0": "b"},
                            daemon_json="absent", containers={}, volumes={}, networks={}, images=set(),
                            volume_images=set(), loops={}, firewall={"-N TSM-INPUT"}, netns=set(), paths=set())
    return dataclasses.replace(base, **over)


@pytest.fixture(autouse=True)
def run(monkeypatch: pytest.MonkeyPatch) -> machine.Run:
    r = machine.Run(manager_ids={"test-mine"}, images={"toolserver-manager:chart-pod-test"}, host_tags={"ab12"})
    monkeypatch.setattr(machine, "RUN", r)
    return r


def test_nothing_changed_is_no_problem(tmp_path: Path) -> None:
    assert machine.problems(snap(), snap(), tmp_path) == []


@pytest.mark.parametrize("after,words", [
    ({"dockerd_pid": "200"}, "the machine's dockerd changed: pid 100 at the start, 200 now"),
    ({"redis_run_ids": {"redis://:pw@127.0.0.1:6380/0": "a", "redis://127.0.0.1:6379/0": "c"}},
     "Redis redis://127.0.0.1:6379/0 changed"),
    ({"daemon_json": hashlib.sha256(b"{}").hexdigest()}, "daemon.json changed"),
    ({"containers": {"c" * 64: "test-mine"}}, "containers of this run's manager_ids left"),
    ({"volumes": {"tsm-session-x": "test-mine"}}, "volumes of this run's manager_ids left"),
    ({"networks": {"tsm-test-mine-open": "test-mine"}}, "networks of this run's manager_ids left"),
    ({"images": {"toolserver-manager:chart-pod-test"}}, "images this run tagged are still there"),
    ({"loops": {"/dev/loop9": "/var/lib/toolserver-manager/workspaces/x.img"}, "lasting_loops": {"/dev/loop9"}},
     "loop devices backed by the project's images"),
    ({"firewall": {"-N TSM-INPUT", "-N TSM-ALLOW"}}, "firewall chains or rules added"),
    ({"firewall": {"-N TSM-INPUT", "-A FORWARD -i tsmhbrab12 -o tsmhbrab12 -j ACCEPT"}}, "firewall chains or rules"),
    ({"firewall": {"-N TSM-INPUT", f"nft table inet {MY_TABLE}"}}, "firewall chains or rules added"),
    ({"netns": {"host1-ab12"}}, "network namespaces of this run's test hosts left"),
    ({"paths": {"/var/lib/toolserver-manager/tsmh-ab12-1"}}, "engine data, sockets or locks left"),
])
def test_each_change_is_named(after: dict[str, object], words: str, tmp_path: Path) -> None:
    found = machine.problems(snap(), snap(**after), tmp_path)
    assert len(found) == 1 and words in found[0], found
    assert "pw" not in found[0]  # a password in a Redis URL is never printed


def test_another_runs_objects_are_not_blamed_on_this_one(tmp_path: Path) -> None:
    other = snap(containers={"d" * 64: "test-theirs"}, volumes={"tsm-session-y": "test-theirs"},
                 networks={"tsm-test-theirs-open": "test-theirs"}, images={"toolserver-node:theirs"},
                 loops={"/dev/loop3": "/var/lib/toolserver-manager/workspaces/y.img"},  # theirs: it has a volume
                 firewall={"-N TSM-INPUT", "-A FORWARD -o tsmo0123456789 -j DOCKER", f"nft table inet {THEIR_TABLE}"},
                 netns={"host1-cd34"},
                 paths={"/run/tsmh-cd34-1.sock"})
    assert machine.problems(snap(), other, tmp_path) == []


def test_a_node_image_copy_in_the_temp_dir_is_named(tmp_path: Path) -> None:
    big = tmp_path / "sub" / "node.tar"
    big.parent.mkdir()
    with open(big, "wb") as f:
        f.truncate(machine.BIG_FILE + 1)
    try:
        found = machine.problems(snap(), snap(), tmp_path)
    finally:
        big.unlink()  # or the run's own check finds it too
    assert len(found) == 1 and str(big) in found[0], found
