"""Node secrets that Redis never holds: each is HMAC-SHA256 of the session id under a key kept
outside Redis (a root-only file, a Kubernetes Secret) and shared by every replica.

Whoever reads Redis (a local user once it had no password, a leaked dump or replica) learns no
node's secret: it sees session ids only. Derived rather than encrypted: nothing to store at all,
and every replica computes the same secret for a session without a round trip.

Records written before the key was configured keep their clear ``secret`` field and it is used
as it is (their containers were started with it), so a rolling upgrade keeps every session;
a session's next new container (resume from its workspace) gets the derived secret and its
record loses the clear one. Without a key, secrets are random and kept in the record, as before.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from shared.models import NodeRecord

_MEMO = 16384  # derived secrets kept in memory (a few MB at most)
_LABEL = b"toolserver-manager node secret\x00"  # domain separation: the key may serve nothing else


class NodeSecrets:
    """What a node requires in X-Node-Secret, and what of it may be written to Redis."""

    def __init__(self, key: str = "") -> None:
        self._key = key.encode() if key else b""
        # the proxy adds a session's secret to every request it forwards: an HMAC each time was a
        # few µs of a request's CPU (benchmarks/proxy_profile.py); bounded, then started afresh
        self._derived: dict[str, str] = {}

    @property
    def derived(self) -> bool:
        return bool(self._key)

    def derive(self, session_id: str) -> str:
        """The session's secret under the key (43 URL-safe characters, as token_urlsafe(32))."""
        known = self._derived.get(session_id)
        if known is not None:
            return known
        mac = hmac.new(self._key, _LABEL + session_id.encode(), hashlib.sha256).digest()
        secret = base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
        if len(self._derived) >= _MEMO:
            self._derived.clear()
        self._derived[session_id] = secret
        return secret

    def new(self, session_id: str, current: str = "") -> str:
        """The secret for a new container of a session: derived with a key (a record's clear one is
        retired here), else the session's current one or a fresh random one."""
        if self._key:
            return self.derive(session_id)
        return current or secrets.token_urlsafe(32)

    def of(self, rec: NodeRecord) -> str:
        """The secret the record's node was started with: its clear one (records older than the
        key), else the derived one ("" without a key: the node will refuse, and say so)."""
        if rec.secret:
            return rec.secret
        return self.derive(rec.id) if self._key else ""

    def stored(self, session_id: str, secret: str) -> str:
        """What the record may keep of a secret: nothing when it is the derived one."""
        if self._key and hmac.compare_digest(secret, self.derive(session_id)):
            return ""
        return secret
