"""Request bodies streamed through the egress proxy with secrets' placeholders replaced, in bounded
memory: chunked bodies and bodies over ``secrets.MAX_BODY`` (smaller ones of known length are
read whole, so their Content-Length stays exact: shared/egress/proxy.py).

The body is decoded (``Transfer-Encoding: chunked`` or ``Content-Length``), its bytes pass through
a ``Replacer`` that holds back at most one placeholder's length (a placeholder split across reads
or chunks is seen whole), and it goes on chunked when anything may be replaced (its new length
is not known before its end), else framed as it came. Nothing keeps more than one read plus
``Replacer.HOLD`` bytes.
"""

from __future__ import annotations

from shared.egress.secrets import PLACEHOLDER, Secret

PREFIX = b"tsm-secret:"
# the longest placeholder: the prefix and a name of 63 characters (secrets.NAME)
LONGEST = len(PREFIX) + 63
MAX_LINE = 4096  # a chunk-size or trailer line longer than this is not HTTP we forward


class BodyError(ValueError):
    """The node's body is not well-formed HTTP/1.1 framing."""


class Replacer:
    """Placeholders replaced in a stream of bytes (only for secrets bound to bodies for ``host``),
    the rest unchanged; the names used and those left as they were (``used``, ``unbound``)."""

    HOLD = LONGEST

    def __init__(self, secrets: dict[str, Secret], host: str) -> None:
        self.secrets = secrets
        self.host = host
        self.held = b""
        self.used: list[str] = []
        self.unbound: list[str] = []

    def feed(self, data: bytes) -> bytes:
        """What can go on now; a tail that may begin a placeholder is held for the next bytes."""
        buf = self.held + data
        out: list[bytes] = []
        at = 0
        cut = len(buf)
        for m in PLACEHOLDER.finditer(buf):
            # a name running to the end of what is here may go on in the next bytes
            if m.end() == len(buf) and m.end() - m.start() < LONGEST:
                cut = m.start()
                break
            out += [buf[at:m.start()], self._swap(m.group(1).decode(), m.group(0))]
            at = m.end()
        else:
            # the tail may be the prefix's first bytes (or the whole prefix, no name yet)
            for k in range(min(len(PREFIX), len(buf) - at), 0, -1):
                if buf.endswith(PREFIX[:k]):
                    cut = len(buf) - k
                    break
        out.append(buf[at:cut])
        self.held = buf[cut:]
        return b"".join(out)

    def end(self) -> bytes:
        """The held tail, at the body's end (a placeholder there is whole)."""
        buf, self.held = self.held, b""
        out, at = [], 0
        for m in PLACEHOLDER.finditer(buf):
            out += [buf[at:m.start()], self._swap(m.group(1).decode(), m.group(0))]
            at = m.end()
        out.append(buf[at:])
        return b"".join(out)

    def _swap(self, name: str, raw: bytes) -> bytes:
        s = self.secrets.get(name)
        if s is not None and s.body and s.bound_to(self.host):
            self.used.append(name)
            return s.value.encode()
        self.unbound.append(name)
        return raw


def header(head: bytes, name: bytes) -> bytes | None:
    """One header's value (the last one) in a request head, None when absent."""
    found = None
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            found = value.strip()
    return found


def is_chunked(head: bytes) -> bool:
    te = header(head, b"transfer-encoding")
    return te is not None and te.lower().split(b",")[-1].strip() == b"chunked"


def as_chunked(head: bytes) -> bytes:
    """The head (ending in a blank line) framed chunked: no Content-Length, Transfer-Encoding set."""
    lines = head[:-4].split(b"\r\n")
    kept = [line for line in lines
            if line.partition(b":")[0].strip().lower() not in (b"content-length", b"transfer-encoding")]
    return b"\r\n".join([*kept, b"Transfer-Encoding: chunked"]) + b"\r\n\r\n"


class BodyStream:
    """One request body from the node: ``feed`` what was read, get what goes upstream; ``done``
    once the body ended (``rest``: bytes read past it)."""

    def __init__(self, replacer: Replacer, length: int | None, rechunk: bool) -> None:
        self.r = replacer
        self.left = length  # None: chunked from the node
        self.rechunk = rechunk or length is None
        self.done = length == 0
        self.rest = b""
        self._raw = b""  # chunked framing not yet parsed (a size line, a chunk's CRLF, trailers)
        self._chunk_left = 0
        self._state = "size"  # size, data, crlf, trailer

    def feed(self, data: bytes) -> bytes:
        if self.done:
            self.rest += data
            return b""
        if self.left is not None:
            take = data[:self.left]
            self.left -= len(take)
            out = self.r.feed(take)
            if self.left == 0:
                self.done = True
                self.rest = data[len(take):]
                out += self.r.end()
            return self._frame(out, last=self.done)
        return self._frame(self._dechunk(data), last=self.done)

    def _frame(self, out: bytes, last: bool) -> bytes:
        if not self.rechunk:
            return out
        framed = b"%x\r\n%s\r\n" % (len(out), out) if out else b""
        return framed + (b"0\r\n" + self._trailers + b"\r\n" if last else b"")

    _trailers = b""

    def _dechunk(self, data: bytes) -> bytes:
        buf = self._raw + data
        self._raw = b""
        out: list[bytes] = []
        i = 0
        while i < len(buf) and not self.done:
            if self._state == "data":
                take = buf[i:i + self._chunk_left]
                out.append(self.r.feed(take))
                self._chunk_left -= len(take)
                i += len(take)
                if self._chunk_left == 0:
                    self._state = "crlf"
                continue
            end = buf.find(b"\r\n", i)
            if end == -1:
                if len(buf) - i > MAX_LINE:
                    raise BodyError("a chunk-size or trailer line too long")
                self._raw = buf[i:]
                break
            line, i = buf[i:end], end + 2
            if self._state == "crlf":
                if line:
                    raise BodyError("no CRLF after a chunk's data")
                self._state = "size"
            elif self._state == "size":
                try:
                    self._chunk_left = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise BodyError(f"bad chunk size {line[:20]!r}") from None
                self._state = "data" if self._chunk_left else "trailer"
            elif line:  # a trailer field: goes on as it is
                self._trailers += line + b"\r\n"
                if len(self._trailers) > MAX_LINE:
                    raise BodyError("trailers too long")
            else:
                self.done = True
                out.append(self.r.end())
        if self.done:
            self.rest = buf[i:]
        return b"".join(out)
