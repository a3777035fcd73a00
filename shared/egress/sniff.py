"""The name a connection asks for, read from its first bytes: the SNI of a TLS ClientHello, or
the Host of an HTTP/1 request head. Pure functions over bytes; ``MORE`` means "read on"."""

from __future__ import annotations

import struct

MORE = "\0more"  # not enough bytes yet
MAX_HEAD = 16384  # a ClientHello or request head longer than this is refused


def tls_sni(data: bytes) -> str | None:
    """The server name of a TLS ClientHello (None: not a ClientHello, or one without SNI)."""
    if len(data) < 5:
        return MORE
    if data[0] != 0x16:  # handshake record
        return None
    rec_len = struct.unpack("!H", data[3:5])[0]
    if len(data) < 5 + rec_len:
        return MORE
    body = data[5:5 + rec_len]
    try:
        if body[0] != 0x01:  # ClientHello
            return None
        p = 4 + 2 + 32  # handshake header, version, random
        p += 1 + body[p]  # session id
        p += 2 + struct.unpack("!H", body[p:p + 2])[0]  # cipher suites
        p += 1 + body[p]  # compression methods
        end = p + 2 + struct.unpack("!H", body[p:p + 2])[0]
        p += 2
        while p + 4 <= end:
            ext, size = struct.unpack("!HH", body[p:p + 4])
            p += 4
            if ext == 0:  # server_name: list length, then (type, length, name)
                if body[p + 2] != 0:
                    return None
                n = struct.unpack("!H", body[p + 3:p + 5])[0]
                return body[p + 5:p + 5 + n].decode("ascii").lower().rstrip(".")
            p += size
    except (IndexError, struct.error, UnicodeDecodeError):
        return None
    return None


def http_host(data: bytes) -> str | None:
    """The Host of an HTTP/1 request head, without its port (None: no complete head with a Host)."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return MORE if len(data) < MAX_HEAD else None
    lines = data[:end].split(b"\r\n")
    if len(lines[0].split(b" ")) != 3:
        return None
    hosts = [line.split(b":", 1)[1].strip() for line in lines[1:] if line.lower().startswith(b"host:")]
    if len(hosts) != 1:  # none, or two that could be read two ways
        return None
    host = hosts[0].decode("latin-1").lower()
    if host.startswith("["):
        return None
    return host.rsplit(":", 1)[0] if ":" in host else host


def close_after(data: bytes) -> bytes:
    """The request head with ``Connection: close``: one request per connection, so every request
    a node sends through the proxy is one whose Host was checked."""
    end = data.find(b"\r\n\r\n")
    lines = data[:end].split(b"\r\n")
    kept = [line for line in lines[1:] if not line.lower().startswith((b"connection:", b"keep-alive:"))]
    return b"\r\n".join([lines[0], *kept, b"Connection: close"]) + data[end:]
