"""Secrets that never enter a node: sealed at rest, a placeholder inside, the value only on the wire
to the hosts a secret is bound to.

- **At rest** a value is sealed with AES-256-GCM (``cryptography``: the maintained binding of
  OpenSSL's AEADs) under a key derived from ``egress.secrets_key(_file)``; Redis holds only the
  sealed form, and the secret's name is the associated data (a sealed value moved to another name
  does not open).
- **In the node** an environment variable holds ``placeholder(name)``, a token naming the secret.
- **On the wire** the egress proxy terminates the node's TLS to a bound host with a certificate of
  the per-cluster CA (``egress.ca_cert_file``/``ca_key_file``, which nodes trust), replaces the
  placeholders of the secrets bound to that host in the request head, and talks to the real host
  over TLS it verifies. A placeholder of a secret not bound to that host goes out as it is, and
  the attempt is recorded. A secret stored with ``body: true`` is replaced in request bodies too
  (``substitute_body``: a body of known length up to ``MAX_BODY``, its Content-Length rewritten;
  chunked and larger bodies are streamed, shared/egress/bodies.py); in a body, the placeholder of a
  secret not bound to bodies for that host goes out as it is.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
import re
import ssl
import tempfile
import threading
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import NameOID

from shared.egress.policy import name_matches

PLACEHOLDER = re.compile(rb"tsm-secret:([a-z0-9][a-z0-9_.-]{0,62})")
NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
MAX_BODY = 1 << 20  # bodies read whole to replace placeholders in (their length kept exact): larger ones are streamed


def placeholder(name: str) -> str:
    """What a node sees instead of the secret's value."""
    return f"tsm-secret:{name}"


class SecretBox:
    """Seals under one key (any string: hashed to 256 bits) and opens under it or, while a key is
    being rotated, under the old ones (``egress.secrets_old_keys``)."""

    def __init__(self, key_material: str, old: list[str] | tuple[str, ...] = ()) -> None:
        self.aead = AESGCM(hashlib.sha256(key_material.encode()).digest())
        self.old = [AESGCM(hashlib.sha256(k.encode()).digest()) for k in old if k and k != key_material]

    def seal(self, name: str, value: str) -> str:
        nonce = os.urandom(12)
        return base64.b64encode(nonce + self.aead.encrypt(nonce, value.encode(), name.encode())).decode()

    def open(self, name: str, sealed: str) -> str:
        return self.open_which(name, sealed)[0]

    def open_which(self, name: str, sealed: str) -> tuple[str, bool]:
        """The value, and whether the current key sealed it (InvalidTag: no key known opens it)."""
        raw = base64.b64decode(sealed)
        try:
            return self.aead.decrypt(raw[:12], raw[12:], name.encode()).decode(), True
        except InvalidTag:
            for aead in self.old:
                try:
                    return aead.decrypt(raw[:12], raw[12:], name.encode()).decode(), False
                except InvalidTag:
                    continue
            raise


@dataclass(frozen=True)
class Secret:
    name: str
    value: str
    hosts: tuple[str, ...]
    body: bool = False  # replaced in request bodies too, not only headers

    def bound_to(self, host: str) -> bool:
        return any(name_matches(host, h) for h in self.hosts)


def substitute_body(body: bytes, secrets: dict[str, Secret], host: str) -> tuple[bytes, list[str], list[str]]:
    """A request body with the placeholders of secrets bound to ``host`` *for bodies* replaced; the
    names used, and those left as they are (not bound to this host, or to headers only)."""
    used: list[str] = []
    unbound: list[str] = []

    def swap(m: re.Match[bytes]) -> bytes:
        name = m.group(1).decode()
        s = secrets.get(name)
        if s is not None and s.body and s.bound_to(host):
            used.append(name)
            return s.value.encode()
        unbound.append(name)
        return m.group(0)

    return PLACEHOLDER.sub(swap, body), used, unbound


def body_length(head: bytes) -> int | None:
    """The Content-Length of a request head (None: none, or a chunked or unreadable one)."""
    length = None
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        key = key.strip().lower()
        if key == b"transfer-encoding":
            return None
        if key == b"content-length":
            try:
                length = int(value.strip())
            except ValueError:
                return None
    return length


def without_expect(head: bytes) -> tuple[bytes, bool]:
    """The head without ``Expect: 100-continue`` and whether it had it: a client waiting for the
    100 before it sends its body gets it from the proxy, which must read the body first."""
    lines = head[:-4].split(b"\r\n")
    kept = [line for line in lines if line.partition(b":")[0].strip().lower() != b"expect"]
    return b"\r\n".join(kept) + b"\r\n\r\n", len(kept) != len(lines)


def with_length(head: bytes, length: int) -> bytes:
    """The head (ending in a blank line) with its Content-Length set to ``length``."""
    lines = head[:-4].split(b"\r\n")
    out = [line if line.partition(b":")[0].strip().lower() != b"content-length" else b"Content-Length: %d" % length
           for line in lines]
    return b"\r\n".join(out) + b"\r\n\r\n"


def substitute(head: bytes, secrets: dict[str, Secret], host: str) -> tuple[bytes, list[str], list[str]]:
    """The request head with the placeholders of secrets bound to ``host`` replaced; the names
    used, and the names whose placeholder was sent to a host they are not bound to (left as is).
    Only header lines are touched, never the request line (a value in a URL would be logged)."""
    used: list[str] = []
    unbound: list[str] = []
    end = head.find(b"\r\n\r\n")
    lines = head[:end].split(b"\r\n")

    def swap(m: re.Match[bytes]) -> bytes:
        name = m.group(1).decode()
        s = secrets.get(name)
        if s is not None and s.bound_to(host):
            used.append(name)
            return s.value.encode()
        unbound.append(name)
        return m.group(0)

    out = [lines[0], *(PLACEHOLDER.sub(swap, line) for line in lines[1:])]
    for m in PLACEHOLDER.finditer(lines[0]):
        unbound.append(m.group(1).decode())
    return b"\r\n".join(out) + head[end:], used, unbound


class CertMint:
    """TLS server contexts for any host name, each with a leaf certificate of the cluster CA."""

    def __init__(self, ca_cert_pem: bytes, ca_key_pem: bytes) -> None:
        self.ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
        self.ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.contexts: dict[str, ssl.SSLContext] = {}
        self.lock = threading.Lock()

    def context(self, host: str) -> ssl.SSLContext:
        with self.lock:
            ctx = self.contexts.get(host)
            if ctx is None:
                ctx = self.contexts[host] = self._make(host)
            return ctx

    def _make(self, host: str) -> ssl.SSLContext:
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
                .issuer_name(self.ca_cert.subject).public_key(self.key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=7))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
                .sign(self.ca_key, hashes.SHA256()))  # type: ignore[arg-type]
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        # load_cert_chain reads files: the leaf and its key go through a private temp file at once
        with tempfile.NamedTemporaryFile("wb", suffix=".pem") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
            f.write(self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
            f.flush()
            ctx.load_cert_chain(f.name)
        return ctx
