"""The done set: the ``done`` table of one namespace, and its counter in ``namespaces``."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from .connection import _SqliteStore
from .rows import is_count, log
from .statements import BATCH_DONE_ADD, BATCH_DONE_REMOVE, _batch, _chunks, _Delta


def add_done(c: sqlite3.Connection, ns: int, keys: Sequence[bytes], delta: _Delta) -> int:
    """Add ``keys`` to the done set of ``ns`` (also in the queue's commit); return how many were new."""
    added = 0
    for chunk in _chunks(list(dict.fromkeys(keys))):
        params = [value for key in chunk for value in (ns, key)]
        added += max(c.execute(_batch(BATCH_DONE_ADD, len(chunk), "(?, ?)"), params).rowcount, 0)
    delta.done += added
    return added


def remove_done(c: sqlite3.Connection, ns: int, keys: Sequence[bytes], delta: _Delta) -> int:
    """Remove ``keys`` from the done set of ``ns``; return how many were present."""
    removed = 0
    for chunk in _chunks(list(dict.fromkeys(keys))):
        removed += max(c.execute(_batch(BATCH_DONE_REMOVE, len(chunk)), (ns, *chunk)).rowcount, 0)
    delta.done -= removed
    return removed


class SqliteDoneSet(_SqliteStore):
    """SQLite :class:`~achihuo_mini.backend.DoneSetBackend`: the ``done`` table of one namespace.

    ``SqliteDoneSet(namespace, path=None, busy_timeout=30.0, poll_interval=0.05)``.
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

    async def contains(self, keys: Sequence[bytes]) -> list[bool]:
        """Membership of each key, in order."""
        if not keys:
            return []
        return await self._call(self._t_contains, list(keys), mode="read")

    def _t_contains(self, c: sqlite3.Connection, keys: Sequence[bytes]) -> list[bool]:
        ns = self._ns
        found: set[bytes] = set()
        distinct = list(dict.fromkeys(keys))
        for i in range(0, len(distinct), 500):
            chunk = distinct[i : i + 500]
            marks = ",".join("?" * len(chunk))
            found.update(
                row[0]
                for row in c.execute(
                    f"SELECT key FROM done WHERE ns = ? AND key IN ({marks})",
                    (ns, *chunk),
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
