"""The harness's own promises, on real processes: a test talks to the manager it started."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from testing.harness import ManagerProc, _worker_ports, free_port
from tests.conftest import base_config


def test_a_manager_whose_port_another_one_answers_is_not_taken_for_started(
        start_manager, managers: list[ManagerProc], tmp_path: Path, prefix: str, manager_id: str) -> None:
    # two xdist workers once probed the same free port: the second manager exited for it while the
    # first answered its /alive, and its test ran against a manager without its config
    first = start_manager(name="first")
    second = ManagerProc(base_config(prefix, manager_id), tmp_path, "second")
    second.port, second.url = first.port, first.url
    second.cfg["port"] = first.port
    second.path.write_text(yaml.safe_dump(second.cfg))
    managers.append(second)
    with pytest.raises(RuntimeError, match="is answered by replica 'first-"):
        second.start(timeout=30)


def test_free_ports_are_this_workers_own_and_never_given_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "3")
    slices = []
    for worker in ("gw0", "gw1", "gw2"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        slices.append(set(_worker_ports()))
    assert not (slices[0] & slices[1]) and not (slices[1] & slices[2]) and not (slices[0] & slices[2])
    assert all(max(s) < 30000 for s in slices)  # below NodePorts and the kernel's ephemeral ports
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    given = [free_port() for _ in range(50)]
    assert len(set(given)) == 50 and set(given) <= slices[1]
