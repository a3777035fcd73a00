"""Egress secrets in Redis: one hash field a secret, its value only ever encrypted
(shared/egress/secrets.py encrypts before and decrypts after; this part never sees it in clear).
A part of the store (``store.egress_secrets``)."""

from __future__ import annotations

import msgspec

from shared.store.base import Part, Script, redis_errors, text

# one field replaced only while it still holds what was read: a rotation never undoes a put made
# while it ran
REPLACE = """
if redis.call('hget', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('hset', KEYS[1], ARGV[1], ARGV[3])
  return 1
end
return 0
"""


class StoredSecret(msgspec.Struct, kw_only=True):
    """A secret as kept: the hosts it is bound to and its sealed value."""

    hosts: list[str]
    sealed: str  # base64 nonce + AES-GCM ciphertext
    updated_at: float = 0.0
    body: bool = False  # replaced in request bodies as well as headers


class EgressSecretStore(Part):
    _replace = Script(REPLACE)

    async def replace(self, name: str, was: StoredSecret, now: StoredSecret) -> bool:
        """Store ``now`` in place of ``was`` (False: the secret changed or went meanwhile)."""
        with redis_errors():
            return bool(await self._replace(keys=[self.keys.egress_secrets()],
                                            args=[name, msgspec.json.encode(was), msgspec.json.encode(now)]))

    async def put(self, name: str, secret: StoredSecret) -> None:
        with redis_errors():
            await self.redis.hset(self.keys.egress_secrets(), name, msgspec.json.encode(secret))

    async def delete(self, name: str) -> bool:
        with redis_errors():
            return bool(await self.redis.hdel(self.keys.egress_secrets(), name))

    async def all(self) -> dict[str, StoredSecret]:
        with redis_errors():
            raw = await self.redis.hgetall(self.keys.egress_secrets())
        out = {}
        for k, v in (raw or {}).items():
            try:
                out[text(k)] = msgspec.json.decode(v, type=StoredSecret)
            except msgspec.DecodeError:
                continue
        return out
