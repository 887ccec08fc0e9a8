"""The statements of the queue's hot path, how batches become statements, and the deque helpers.

Hot-path statements are module constants (``SQL_*`` and ``BATCH_*``) so that the tests can
check their query plans. Set-based statements (commit, push, reserve) run one statement per
chunk of up to :data:`CHUNK` rows instead of one per task: each ``{}`` becomes a list of
rows whose count is padded to a power of two (repeating a row where that changes nothing,
or with all-NULL rows that ``WHERE column1 IS NOT NULL`` filters out), so a handful of
texts per statement covers every batch size and they stay in the statement cache.

Deque positions are read with bounds (``POS_LIMIT``): a stored ``pos`` that is text or a
blob (written by someone else) sorts after every number in SQLite, so an unbounded
``max(pos)`` would return it and break every push.
"""

from __future__ import annotations

import functools
import itertools
import math
import sqlite3
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

from .rows import valid_text

# What the package re-exports: the tests read the statements from it to check their query plans.
__all__ = [
    "BATCH_ACK",
    "BATCH_BLOCKED",
    "BATCH_DONE_ADD",
    "BATCH_DONE_EXPIRE",
    "BATCH_DONE_KEEP",
    "BATCH_DONE_LIVE",
    "BATCH_DONE_REMOVE",
    "BATCH_HELD",
    "BATCH_INSERT",
    "BATCH_LEASE",
    "BATCH_PENDING_ADD",
    "BATCH_PENDING_DEC",
    "BATCH_PENDING_DROP",
    "SQL_ANY_READY",
    "SQL_DONE_SWEEP",
    "SQL_DUE",
    "SQL_HELD",
    "SQL_LEASED_BY",
    "SQL_LEASES",
    "SQL_MAX_POS",
    "SQL_MIN_POS",
    "SQL_NEXT_DUE",
    "SQL_ORPHANS",
    "SQL_READY",
    "CHUNK",
    "_batch",
]

_T = TypeVar("_T")

POS_LIMIT = 2**62
"""Deque positions live in ``(-POS_LIMIT, POS_LIMIT)``; anything else stored there is ignored."""

SQL_READY = (
    "SELECT id, payload, key, attempt, failures FROM tasks WHERE ns = ? AND pos IS NOT NULL ORDER BY pos LIMIT ?"
)
SQL_DUE = "SELECT id FROM tasks WHERE ns = ? AND due IS NOT NULL AND due <= ? ORDER BY due, id LIMIT ?"
SQL_MIN_POS = f"SELECT min(pos) FROM tasks WHERE ns = ? AND pos IS NOT NULL AND pos > {-POS_LIMIT}"
SQL_MAX_POS = f"SELECT max(pos) FROM tasks WHERE ns = ? AND pos IS NOT NULL AND pos < {POS_LIMIT}"
SQL_NEXT_DUE = "SELECT min(due) FROM tasks WHERE ns = ? AND due IS NOT NULL"
SQL_ANY_READY = "SELECT 1 FROM tasks WHERE ns = ? AND pos IS NOT NULL LIMIT 1"
SQL_HELD = "SELECT key, payload, failures FROM tasks WHERE id = ? AND ns = ? AND worker = ? AND attempt = ?"
SQL_LEASED_BY = "SELECT id, worker, attempt FROM tasks WHERE ns = ? AND worker = ? ORDER BY id"
SQL_LEASES = "SELECT id, payload, key, attempt, failures FROM tasks WHERE ns = ? AND worker = ? ORDER BY id"
SQL_ORPHANS = (
    "SELECT id, worker, attempt FROM tasks WHERE ns = ? AND worker IS NOT NULL "
    "AND worker NOT IN (SELECT worker FROM workers WHERE ns = ?) ORDER BY id"
)

CHUNK = 128
"""Rows per set-based statement: at most 5 values a row stays under the 999 variables of SQLite < 3.32."""

BATCH_HELD = (
    "SELECT group_concat(v.column1) FROM (VALUES {}) AS v JOIN tasks ON tasks.id = v.column2 "
    "WHERE tasks.ns = ? AND tasks.worker = v.column3 AND tasks.attempt = v.column4"
)
BATCH_ACK = "DELETE FROM tasks WHERE id IN ({})"
BATCH_LEASE = "UPDATE tasks SET pos = NULL, worker = ?, attempt = attempt + 1 WHERE id IN ({})"
BATCH_PENDING_DROP = "DELETE FROM pending WHERE ns = ? AND n <= ? AND key IN ({})"
BATCH_PENDING_DEC = "UPDATE pending SET n = n - ? WHERE ns = ? AND key IN ({})"
BATCH_PENDING_ADD = (
    "INSERT INTO pending (ns, key, n) SELECT * FROM (VALUES {}) WHERE column1 IS NOT NULL "
    "ON CONFLICT (ns, key) DO UPDATE SET n = n + excluded.n"
)
BATCH_BLOCKED = (
    "SELECT group_concat(hex(key)) FROM (SELECT key FROM pending WHERE ns = ? AND key IN ({0}) "
    "UNION ALL SELECT key FROM done WHERE ns = ? AND key IN ({0}) AND (expires IS NULL OR expires > ?))"
)
BATCH_INSERT = "INSERT INTO tasks (ns, payload, key, pos, due) SELECT * FROM (VALUES {}) WHERE column1 IS NOT NULL"
BATCH_DONE_ADD = "INSERT OR IGNORE INTO done (ns, key) VALUES {}"
BATCH_DONE_REMOVE = "DELETE FROM done WHERE ns = ? AND key IN ({})"
# expiring names (a ttl; expires: unix time, NULL: for ever). A name whose ttl passed is not done.
BATCH_DONE_LIVE = (
    "SELECT count(*), count(CASE WHEN expires IS NULL OR expires > ? THEN 1 END) FROM done "
    "WHERE ns = ? AND key IN ({})"
)
BATCH_DONE_KEEP = "UPDATE done SET expires = NULL WHERE ns = ? AND key IN ({}) AND +expires IS NOT NULL"
BATCH_DONE_EXPIRE = (
    "INSERT INTO done (ns, key, expires) SELECT * FROM (VALUES {}) WHERE column1 IS NOT NULL "
    "ON CONFLICT (ns, key) DO UPDATE SET expires = excluded.expires"
)
SQL_DONE_SWEEP = (
    "DELETE FROM done WHERE ns = ? AND key IN "
    "(SELECT key FROM done WHERE ns = ? AND expires IS NOT NULL AND expires <= ? ORDER BY expires LIMIT ?)"
)
"""Drops up to N names whose ttl passed, oldest first (each ``add_expiring`` sweeps a few)."""


def _bucket(n: int) -> int:
    """``n`` (1..CHUNK) rounded up to a power of two."""
    return 1 << (n - 1).bit_length()


@functools.cache
def _batch(template: str, rows: int, row: str = "?", sep: str = ", ") -> str:
    """``template`` with ``rows`` copies of ``row`` (joined by ``sep``) in place of ``{}``."""
    return template.format(sep.join([row] * rows))


def _chunks(items: Sequence[_T]) -> Iterator[list[_T]]:
    """``items`` in chunks of at most CHUNK, each padded to a power of two by repeating its last item.

    Only for statements where a repeated row changes nothing (``IN`` lists, ``OR``
    terms, ``INSERT OR IGNORE``).
    """
    for i in range(0, len(items), CHUNK):
        chunk = list(items[i : i + CHUNK])
        chunk.extend(itertools.repeat(chunk[-1], _bucket(len(chunk)) - len(chunk)))
        yield chunk


def _values(rows: Sequence[tuple[Any, ...]], width: int) -> Iterator[tuple[int, list[Any]]]:
    """``(n, flat parameters)`` per chunk of ``rows``, padded with all-NULL rows to a power of two."""
    for i in range(0, len(rows), CHUNK):
        chunk = rows[i : i + CHUNK]
        flat = [value for row in chunk for value in row]
        flat.extend(itertools.repeat(None, (_bucket(len(chunk)) - len(chunk)) * width))
        yield len(flat) // width, flat


def _text(value: str) -> str:
    """``value`` if SQLite can store it as text, else with lone surrogates escaped."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


class _Delta:
    """Changes of the namespace counters within one transaction."""

    __slots__ = ("dead", "delayed", "done", "leased", "ready")

    def __init__(self) -> None:
        self.ready = self.delayed = self.leased = self.dead = self.done = 0

    def write(self, c: sqlite3.Connection, ns: int) -> None:
        if self.ready or self.delayed or self.leased or self.dead or self.done:
            c.execute(
                "UPDATE namespaces SET ready = ready + ?, delayed = delayed + ?, leased = leased + ?, "
                "dead = dead + ?, done = done + ? WHERE id = ?",
                (self.ready, self.delayed, self.leased, self.dead, self.done, ns),
            )


# -- the ready deque ---------------------------------------------------------------


def head_start(c: sqlite3.Connection, ns: int) -> int:
    """The position of the head of the ready deque (where the next head task goes just before)."""
    low = c.execute(SQL_MIN_POS, (ns,)).fetchone()[0]
    if low is None:
        return tail_end(c, ns) + 1  # ready is empty
    start: int = math.floor(low)  # a REAL position (written by someone else) counts too
    return start


def tail_end(c: sqlite3.Connection, ns: int) -> int:
    """The position of the tail of the ready deque (0 when it is empty)."""
    high = c.execute(SQL_MAX_POS, (ns,)).fetchone()[0]
    end: int = 0 if high is None else math.ceil(high)
    return end


def to_head(c: sqlite3.Connection, ns: int, ids: Sequence[int], delta: _Delta) -> int:
    """Make leased tasks ``ids`` ready at the head, in this order."""
    if not ids:
        return 0
    start = head_start(c, ns) - len(ids)
    c.executemany(
        "UPDATE tasks SET worker = NULL, pos = ? WHERE id = ?",
        [(start + i, tid) for i, tid in enumerate(ids)],
    )
    delta.leased -= len(ids)
    delta.ready += len(ids)
    return len(ids)


def decrement_pending(c: sqlite3.Connection, ns: int, keys: Sequence[Any]) -> None:
    """Drop one pending count per occurrence in ``keys`` (None: unnamed, nothing to count).

    Keys read from a damaged row may be of any type: each is counted down as stored,
    except text that is not UTF-8, which cannot be written back (and was never counted
    by this backend).
    """
    by_times: dict[int, list[Any]] = {}
    for key, times in Counter(k for k in keys if k is not None and (type(k) is not str or valid_text(k))).items():
        by_times.setdefault(times, []).append(key)
    for times, group in by_times.items():
        for i, chunk in enumerate(_chunks(group)):
            distinct = min(CHUNK, len(group) - i * CHUNK)
            # Rows whose count drops to zero go at once (usually all of them: n is 1)...
            dropped = c.execute(_batch(BATCH_PENDING_DROP, len(chunk)), (ns, times, *chunk)).rowcount
            if dropped < distinct:  # ...the others count down
                c.execute(_batch(BATCH_PENDING_DEC, len(chunk)), (times, ns, *chunk))
