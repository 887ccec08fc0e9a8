"""The done set: the ``done`` table of one namespace, and its counter in ``namespaces``.

A name is done while its row exists and its ``expires`` (unix time; NULL: for ever) has
not passed. The counter counts rows: names whose ttl passed count until they are written
again, removed, or swept (each ``add_expiring`` drops a few of them, oldest first).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence

from .connection import _SqliteStore
from .rows import is_count, log
from .statements import (
    BATCH_DONE_ADD,
    BATCH_DONE_EXPIRE,
    BATCH_DONE_KEEP,
    BATCH_DONE_LIVE,
    BATCH_DONE_REMOVE,
    SQL_DONE_SWEEP,
    _batch,
    _chunks,
    _Delta,
    _values,
)

SWEEP = 2
"""Names whose ttl passed that one ``add_expiring`` drops, per name it writes (plus one)."""


def _live(c: sqlite3.Connection, ns: int, chunk: Sequence[bytes], now: float) -> tuple[int, int]:
    """``(rows, done)`` among the distinct keys of ``chunk``: rows stored, and those not expired."""
    stored, live = c.execute(_batch(BATCH_DONE_LIVE, len(chunk)), (now, ns, *chunk)).fetchone()
    return int(stored), int(live)


def add_done(c: sqlite3.Connection, ns: int, keys: Sequence[bytes], delta: _Delta) -> int:
    """Add ``keys`` for ever to the done set of ``ns`` (also in the queue's commit); return how many
    were not done before (absent, or their ttl had passed)."""
    added = 0
    now = None
    for chunk in _chunks(list(dict.fromkeys(keys))):
        distinct = len(set(chunk))
        inserted = max(c.execute(_batch(BATCH_DONE_ADD, len(chunk), "(?, ?)"), [v for k in chunk for v in (ns, k)])
                       .rowcount, 0)  # fmt: skip
        delta.done += inserted
        added += inserted
        if inserted < distinct:  # some were there: one with a ttl becomes permanent (an expired one is new)
            now = time.time() if now is None else now
            _, live = _live(c, ns, chunk, now)
            added += distinct - live
            c.execute(_batch(BATCH_DONE_KEEP, len(chunk)), (ns, *chunk))
    return added


def add_expiring(c: sqlite3.Connection, ns: int, items: Sequence[tuple[bytes, float]], delta: _Delta) -> int:
    """Add ``(key, ttl)`` pairs (the last pair of a key wins); return how many were not done before.
    Then drop a few names whose ttl passed."""
    now = time.time()
    last = dict(items)
    added = 0
    keys = list(last)
    for i in range(0, len(keys), 128):
        part = keys[i : i + 128]
        for chunk in _chunks(part):
            stored, live = _live(c, ns, chunk, now)
            delta.done += len(part) - stored
            added += len(part) - live
        rows = [(ns, key, now + last[key]) for key in part]
        for n, params in _values(rows, 3):
            c.execute(_batch(BATCH_DONE_EXPIRE, n, "(?, ?, ?)"), params)
    swept = max(c.execute(SQL_DONE_SWEEP, (ns, ns, now, SWEEP * len(keys) + 1)).rowcount, 0)
    delta.done -= swept
    return added


def remove_done(c: sqlite3.Connection, ns: int, keys: Sequence[bytes], delta: _Delta) -> int:
    """Remove ``keys`` from the done set of ``ns``; return how many were done (ttl not passed)."""
    removed = 0
    now = time.time()
    for chunk in _chunks(list(dict.fromkeys(keys))):
        _, live = _live(c, ns, chunk, now)
        removed += live
        delta.done -= max(c.execute(_batch(BATCH_DONE_REMOVE, len(chunk)), (ns, *chunk)).rowcount, 0)
    return removed


class SqliteDoneSet(_SqliteStore):
    """SQLite :class:`~achihuo_mini.backend.DoneSetBackend` (and ``ExpiringDoneSet``): the ``done`` table.

    ``SqliteDoneSet(namespace, path=None, busy_timeout=30.0, poll_interval=0.05, synchronous="auto")``.
    """

    async def add(self, keys: Sequence[bytes]) -> int:
        """Add keys; return how many were new."""
        if not keys:
            return 0
        return await self._call(self._t_add, list(keys))

    def _t_add(self, c: sqlite3.Connection, keys: Sequence[bytes]) -> int:
        delta = _Delta()
        n = add_done(c, self._ns, keys, delta)
        delta.write(c, self._ns)
        return n

    async def add_expiring(self, items: Sequence[tuple[bytes, float]]) -> int:
        """Add keys done for ``ttl`` seconds each (host clock); return how many were not done before."""
        if not items:
            return 0
        return await self._call(self._t_add_expiring, list(items))

    def _t_add_expiring(self, c: sqlite3.Connection, items: Sequence[tuple[bytes, float]]) -> int:
        delta = _Delta()
        n = add_expiring(c, self._ns, items, delta)
        delta.write(c, self._ns)
        return n

    async def contains(self, keys: Sequence[bytes]) -> list[bool]:
        """Membership of each key, in order."""
        if not keys:
            return []
        return await self._call(self._t_contains, list(keys), mode="read")

    def _t_contains(self, c: sqlite3.Connection, keys: Sequence[bytes]) -> list[bool]:
        ns = self._ns
        found: set[bytes] = set()
        distinct = list(dict.fromkeys(keys))
        now = time.time()
        for i in range(0, len(distinct), 500):
            chunk = distinct[i : i + 500]
            marks = ",".join("?" * len(chunk))
            found.update(
                row[0]
                for row in c.execute(
                    f"SELECT key FROM done WHERE ns = ? AND key IN ({marks}) AND (expires IS NULL OR expires > ?)",
                    (ns, *chunk, now),
                )
            )
        return [k in found for k in keys]

    async def remove(self, keys: Sequence[bytes]) -> int:
        """Remove keys; return how many were present."""
        if not keys:
            return 0
        return await self._call(self._t_remove, list(keys))

    def _t_remove(self, c: sqlite3.Connection, keys: Sequence[bytes]) -> int:
        delta = _Delta()
        n = remove_done(c, self._ns, keys, delta)
        delta.write(c, self._ns)
        return n

    async def count(self) -> int:
        """Number of keys in the set (O(1): a counter kept with the rows; counted when it is damaged)."""
        return await self._call(self._t_count, mode="read")

    def _t_count(self, c: sqlite3.Connection) -> int:
        row = c.execute("SELECT done FROM namespaces WHERE id = ?", (self._ns,)).fetchone()
        if row is not None and is_count(row[0]):
            return int(row[0])
        log.warning(
            "SQLite %s: the done counter of %r is damaged; counting the rows",
            self.location,
            self.namespace,
        )
        return int(c.execute("SELECT count(*) FROM done WHERE ns = ?", (self._ns,)).fetchone()[0])

    async def clear(self) -> None:
        """Remove every key of this namespace."""
        await self._call(self._t_clear)

    def _t_clear(self, c: sqlite3.Connection) -> None:
        c.execute("DELETE FROM done WHERE ns = ?", (self._ns,))
        c.execute("UPDATE namespaces SET done = 0 WHERE id = ?", (self._ns,))
