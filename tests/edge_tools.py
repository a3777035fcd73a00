"""Client-side tools for the HTTP edge tests: an h11 client that speaks exactly what a test
says (Expect, chunking, pipelining), socket forwarders that stand in for a reachable
dockerd or Redis until a test stops them, and a process's resident memory."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterable
from pathlib import Path

import h11


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes, interim: list[int]) -> None:
        self.status, self.headers, self.body, self.interim = status, headers, body, interim

    def __repr__(self) -> str:
        return f"Reply({self.status}, {self.headers}, {self.body[:120]!r}, interim={self.interim})"


def _events(conn: h11.Connection, sock: socket.socket) -> Iterable[object]:
    while True:
        ev = conn.next_event()
        if ev is h11.NEED_DATA:
            conn.receive_data(sock.recv(1 << 16))
            continue
        yield ev


def exchange(port: int, method: str, target: str, headers: list[tuple[str, str]] | None = None,
             body: bytes | None = None, expect: bool = False, chunked: bool = False,
             timeout: float = 60, sock: socket.socket | None = None,
             conn: h11.Connection | None = None) -> Reply:
    """One request on a new (or the given) connection; Expect: 100-continue waits for the 100."""
    own = sock is None
    sock = sock or socket.create_connection(("127.0.0.1", port), timeout=timeout)
    conn = conn or h11.Connection(h11.CLIENT)
    try:
        hdrs = [("host", f"127.0.0.1:{port}"), *(headers or [])]
        if body is not None:
            hdrs.append(("transfer-encoding", "chunked") if chunked else ("content-length", str(len(body))))
        if expect:
            hdrs.append(("expect", "100-continue"))
        sock.sendall(conn.send(h11.Request(method=method, target=target, headers=hdrs)))
        interim: list[int] = []
        events = _events(conn, sock)
        final = None
        if expect and body is not None:
            ev = next(events)
            if isinstance(ev, h11.InformationalResponse):
                interim.append(ev.status_code)
            else:
                final = ev  # refused before the body (a server may do that)
        if body is not None and final is None:
            step = 1 << 16
            for i in range(0, len(body), step):
                sock.sendall(conn.send(h11.Data(data=body[i:i + step])))
            sock.sendall(conn.send(h11.EndOfMessage()))
        elif body is None:
            sock.sendall(conn.send(h11.EndOfMessage()))
        while final is None or isinstance(final, h11.InformationalResponse):
            if isinstance(final, h11.InformationalResponse):
                interim.append(final.status_code)
            final = next(events)
        assert isinstance(final, h11.Response), final
        parts = []
        for ev in events:
            if isinstance(ev, h11.Data):
                parts.append(ev.data)
            elif isinstance(ev, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
        return Reply(final.status_code, {k.decode(): v.decode() for k, v in final.headers}, b"".join(parts),
                     interim)
    finally:
        if own:
            sock.close()


class Forwarder:
    """Accepts on a unix or TCP socket and pipes each connection to the real service; stop()
    closes the listener and every piped connection, as if the service had gone away."""

    def __init__(self, target: str | tuple[str, int], listen: str | int | None = None) -> None:
        self.target = target
        if isinstance(listen, str):
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(listen)
            self.listener.bind(listen)
            self.address: str | tuple[str, int] = listen
        else:
            self.listener = socket.socket()
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.listener.bind(("127.0.0.1", listen or 0))
            self.address = self.listener.getsockname()
        self.listener.listen(128)
        self.socks: list[socket.socket] = []
        self.lock = threading.Lock()
        self.running = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _connect(self) -> socket.socket:
        if isinstance(self.target, str):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(self.target)
            return s
        return socket.create_connection(self.target)

    def _accept(self) -> None:
        while self.running:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.running:
                client.close()
                return
            try:
                upstream = self._connect()
            except OSError:
                client.close()
                continue
            with self.lock:
                self.socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def stop(self) -> None:
        self.running = False
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with self.lock:
            for s in self.socks:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self.socks.clear()


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and its children (uvicorn workers)."""
    total = 0
    pids = [pid]
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            pids += [int(c) for c in (task / "children").read_text().split()]
    for p in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total
