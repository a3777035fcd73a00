"""The client transport's cork (manager/edge/protocol.py): a small proxied answer's head waits for its
body and both leave in one write; nothing held is ever lost."""

from __future__ import annotations

from typing import Any

from manager.edge.protocol import _Cork


class Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def cork() -> tuple[_Cork, Transport]:
    t = Transport()
    c: Any = t
    return _Cork(c), t


def test_a_corked_head_leaves_with_the_body_in_one_write() -> None:
    c, t = cork()
    c.cork()
    c.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    assert t.writes == []
    c.write(b"ok")
    assert t.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]
    c.write(b"next")  # only the write after cork() is held
    assert t.writes[-1] == b"next"


def test_nothing_held_is_lost() -> None:
    c, t = cork()
    c.cork()
    c.write(b"head")
    c.close()  # a response given up half-way: the head still goes, then the close
    assert t.writes == [b"head"] and t.closed
    c, t = cork()
    c.cork()
    c.write(b"head")
    c.flush()  # a response that completes without a body write (HEAD)
    assert t.writes == [b"head"]
    c.flush()
    assert t.writes == [b"head"]


def test_uncorked_writes_pass_through_and_the_rest_is_the_transport() -> None:
    c, t = cork()
    c.write(b"a")
    c.write(b"b")
    assert t.writes == [b"a", b"b"]
    assert c.is_closing() is False
