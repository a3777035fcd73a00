"""The per-host circuit as pure logic (the multi-host test drives it on real hosts)."""

from __future__ import annotations

import asyncio
import errno
import time

import pytest

from nodeops.circuit import Circuits, host_unreachable_error
from shared.errors import HostUnreachable


def test_refused_is_a_live_host_timeouts_and_no_route_are_not() -> None:
    assert host_unreachable_error(TimeoutError())
    assert host_unreachable_error(OSError(errno.EHOSTUNREACH, "no route"))
    assert not host_unreachable_error(ConnectionRefusedError(errno.ECONNREFUSED, "refused"))
    assert not host_unreachable_error(None)


def test_open_fails_fast_naming_the_host_then_lets_one_call_through() -> None:
    c = Circuits(retry_seconds=0.2, probe_seconds=10)
    c.check("10.0.0.2")  # closed: nothing raised
    aborted: list[str] = []
    c.on_open.append(lambda host, why: aborted.append(host))
    c.failure("10.0.0.2", 80, "host2", "connect timed out")
    assert aborted == ["10.0.0.2"]
    with pytest.raises(HostUnreachable) as info:  # at once: check() is plain code, no I/O to wait on
        c.check("10.0.0.2")
    assert info.value.status_code == 503 and info.value.detail.startswith("host 10.0.0.2 is unreachable (nodes of host2)")
    c.check("10.0.0.3")  # another host is not affected
    time.sleep(0.25)
    c.check("10.0.0.2")  # half-open: one call goes through
    with pytest.raises(HostUnreachable):
        c.check("10.0.0.2")  # and only one
    c.success("10.0.0.2")
    c.check("10.0.0.2")
    assert not c.is_open("10.0.0.2")


async def test_the_probe_closes_the_circuit_when_the_host_answers() -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    c = Circuits(retry_seconds=60, probe_seconds=0.05)
    c.failure("127.0.0.1", port, "local", "test")
    assert c.is_open("127.0.0.1")
    for _ in range(40):
        await asyncio.sleep(0.05)
        if not c.is_open("127.0.0.1"):
            break
    assert not c.is_open("127.0.0.1")
    server.close()
    c.close()
