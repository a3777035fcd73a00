"""The connection cap fits the descriptor limit: two descriptors per proxied connection."""

from __future__ import annotations

import resource

import pytest

from manager import main


@pytest.mark.parametrize("limit, wanted, cap", [
    ((20000, 20000), 8192, 8192),  # fits: kept
    ((4096, 4096), 8192, (4096 - main.FD_RESERVE) // 2),  # lowered to what fits
    ((4096, 4096), 0, (4096 - main.FD_RESERVE) // 2),  # unbounded asked for: bounded anyway
    ((1024, 65536), 8192, 8192),  # the soft limit raised to the hard one first
])
def test_the_cap_is_what_the_descriptor_limit_allows(monkeypatch: pytest.MonkeyPatch, limit: tuple[int, int],
                                                     wanted: int, cap: int) -> None:
    state = {"limit": limit}
    monkeypatch.setattr(resource, "getrlimit", lambda _: state["limit"])
    monkeypatch.setattr(resource, "setrlimit", lambda _, new: state.update(limit=new))
    assert main._connection_cap(wanted) == cap
    assert state["limit"][0] == limit[1]
