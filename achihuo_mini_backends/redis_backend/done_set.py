"""The Redis done set: :class:`RedisDoneSet`, 16-byte digests in 65 536 hash buckets per loop."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from .connection import RedisBackend, log
from .keys import LEGACY_DONE_PART, all_bucket_keys

__all__ = ["RedisDoneSet"]

MIGRATE_CHUNK = 1000
"""Names moved from the old done SET per step (``SSCAN`` count)."""


class RedisDoneSet(RedisBackend):
    """:class:`~achihuo_mini.backend.DoneSetBackend`: 16-byte digests in 65 536 hash buckets per loop.

    Every method is one script call (``count`` one ``GET``); see the module docstring
    for the layout and :meth:`open` for the move from the old one-SET layout.
    """

    @property
    def _done(self) -> bytes:
        """The old layout's done SET (moved into the buckets by :meth:`open`; gone afterwards)."""
        return self._key(LEGACY_DONE_PART)

    async def open(self) -> None:
        """Connect (see :meth:`RedisBackend.open`), then move an old-layout done SET into the buckets."""
        if self._client is not None:
            return
        await super().open()
        try:
            await self._migrate()
        except BaseException:
            await self.close()
            raise

    async def _migrate(self) -> None:
        """Move the names of the old done SET into the buckets, chunk by chunk.

        Each chunk is added through ``done_add`` (the counter stays exact), then
        removed from the SET: a crash loses nothing, and the next open finishes the
        job. Redis deletes the SET with its last member; the loop ends then (it also
        picks up names an old-version process adds meanwhile).
        """
        client, old = self._redis, self._done
        if not await self._run(client.exists(old)):
            return
        moved = new = 0
        while await self._run(client.exists(old)):
            cursor = 0
            while True:
                cursor, members = await self._run(client.sscan(old, cursor, count=MIGRATE_CHUNK))
                chunk = cast("list[bytes]", members)  # decode_responses=False
                if chunk:
                    new += await self.add(chunk)
                    await self._run(client.srem(old, *chunk))
                    moved += len(chunk)
                if not cursor:
                    break
        log.info("%s: moved %d done names (%d new) from the old SET %r into hash buckets", self, moved, new, old)

    async def add(self, keys: Sequence[bytes]) -> int:
        """How many keys were new."""
        if not keys:
            return 0
        return int(await self._script("done_add", keys, keys))

    async def contains(self, keys: Sequence[bytes]) -> list[bool]:
        """Membership of each key, in order."""
        if not keys:
            return []
        return [bool(x) for x in await self._script("done_contains", keys, keys)]

    async def remove(self, keys: Sequence[bytes]) -> int:
        """How many keys were present."""
        if not keys:
            return 0
        return int(await self._script("done_remove", keys, keys))

    async def count(self) -> int:
        """``GET`` of the counter the scripts keep."""
        return int(await self._run(self._redis.get(self._key("dcount"))) or 0)

    async def clear(self) -> None:
        """``UNLINK`` every bucket and the counter in one script (freed in the background)."""
        client = self._redis
        keys = self._keys + all_bucket_keys(self._bucket_prefix) + [self._done]
        await self._run(self._scripts["done_clear"](keys=keys, args=[], client=client))
