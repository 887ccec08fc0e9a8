"""The Redis done set: :class:`RedisDoneSet`, 16-byte digests in 65 536 hash buckets per loop."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, cast

from .connection import RedisBackend, chunks, delay_ms, log
from .keys import LEGACY_DONE_PART, all_bucket_keys

__all__ = ["RedisDoneSet"]

MIGRATE_CHUNK = 1000
"""Names moved from the old done SET per step (``SSCAN`` count)."""
CLEAR_STEP = 8192
"""Bucket keys one ``done_clear`` or recount step handles."""


class RedisDoneSet(RedisBackend):
    """:class:`~achihuo_mini.backend.DoneSetBackend` (and ``ExpiringDoneSet``): 16-byte digests in 65 536
    hash buckets per loop.

    Every method is one script call per step of STEP_ITEMS names; see the package
    docstring for the layout and :meth:`open` for the move from the old one-SET layout.
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
        picks up names an old-version process adds meanwhile). A member that is not
        a 16-byte digest is dropped with a warning.
        """
        client, old = self._redis, self._done
        if not await self._run(client.exists(old)):
            return
        moved = new = bad = 0
        while await self._run(client.exists(old)):
            cursor = 0
            while True:
                cursor, members = await self._run(client.sscan(old, cursor, count=MIGRATE_CHUNK))
                chunk = cast("list[bytes]", members)  # decode_responses=False
                digests = [m for m in chunk if len(m) == 16]
                if digests:
                    new += await self.add(digests)
                if chunk:
                    await self._run(client.srem(old, *chunk))
                    moved += len(digests)
                    bad += len(chunk) - len(digests)
                if not cursor:
                    break
        log.info("%s: moved %d done names (%d new) from the old SET %r into hash buckets", self, moved, new, old)
        if bad:
            log.warning("%s: dropped %d members of the old done SET that were not 16-byte digests", self, bad)

    async def add(self, keys: Sequence[bytes]) -> int:
        """How many keys were new."""
        return sum([await self._call("done_add", part, part, int, replicated=True) for part in chunks(keys)])

    async def add_expiring(self, items: Sequence[tuple[bytes, float]]) -> int:
        """Add keys done for ``ttl`` seconds each (server clock, the end rounded up to a second);
        how many were not done before. The bucket field holds the second the ttl ends."""
        n = 0
        for part in chunks(items):
            args: list[Any] = []
            for key, ttl in part:
                args += [key, delay_ms(ttl)]
            n += await self._call("done_expire", args, [key for key, _ in part], int, replicated=True)
        return n

    async def contains(self, keys: Sequence[bytes]) -> list[bool]:
        """Membership of each key, in order."""
        out: list[bool] = []
        for part in chunks(keys):
            out += await self._call("done_contains", part, part, lambda r: [bool(int(x)) for x in r])
        return out

    async def remove(self, keys: Sequence[bytes]) -> int:
        """How many keys were present."""
        return sum([await self._call("done_remove", part, part, int) for part in chunks(keys)])

    async def count(self) -> int:
        """The counter the scripts keep (one script call); an unreadable one is recounted (and repaired)."""
        raw: Any = await self._call("done_count", ["get"], keys=())
        if raw is None:
            return 0
        if isinstance(raw, bytes) and re.fullmatch(rb"\d{1,15}", raw):
            return int(raw)
        log.warning("%s: the done-set counter %r is unreadable: recounting the buckets", self, raw[:40])
        buckets = all_bucket_keys(self._bucket_prefix)
        total = 0
        for part in chunks(buckets, CLEAR_STEP):
            total += await self._call("done_count", ["sum"], keys=part, parse=int)
        if await self._call("done_count", ["set", raw, total], keys=(), parse=int):
            log.warning("%s: the done-set counter is %d again", self, total)
        return total

    async def clear(self) -> None:
        """``UNLINK`` every bucket, then the counter, in steps (freed in the background)."""
        parts = list(chunks([*all_bucket_keys(self._bucket_prefix), self._done], CLEAR_STEP))
        for i, part in enumerate(parts, 1):
            await self._call("done_clear", ["last" if i == len(parts) else ""], keys=part)
