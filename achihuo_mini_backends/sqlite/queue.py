"""The queue: ready deque, delayed tasks, leases, dead letters (tables ``tasks``, ``pending``, ``dead``).

Each protocol method is one transaction, run in the backend's thread by ``_call``; its
blocking body (``_t_<method>``) sits right below it. The registry and notifier abilities
come from the base class :class:`~.registry._Registry`.
"""

from __future__ import annotations

import itertools
import sqlite3
import time
from collections.abc import Sequence
from typing import Any, Literal

from achihuo_mini.backend import (
    Commit,
    DeadLetter,
    DoneSetBackend,
    Lease,
    NewTask,
    QueueStats,
)

from .done import SqliteDoneSet, add_done, add_expiring, remove_done
from .hosts import _HostSlots
from .registry import _Registry
from .rows import (
    as_blob,
    dead_letter,
    is_count,
    log,
    requeue_problem,
    task_problem,
    valid_key,
)
from .statements import (
    BATCH_ACK,
    BATCH_BLOCKED,
    BATCH_HELD,
    BATCH_INSERT,
    BATCH_LEASE,
    BATCH_PENDING_ADD,
    SQL_DUE,
    SQL_HELD,
    SQL_READY,
    _batch,
    _chunks,
    _Delta,
    _text,
    _values,
    decrement_pending,
    head_start,
    tail_end,
    to_head,
)

ERROR_LIMIT = 2048
"""Dead-letter error texts are cut to this many characters."""

PROMOTE_LIMIT = 10_000
"""At most this many due delayed tasks move to the tail in one ``reserve`` (bounds the transaction)."""

BURY_LIMIT = 1_000
"""At most this many unreadable ready tasks are moved to the dead letters in one ``reserve``."""


class SqliteQueue(_Registry, _HostSlots):
    """SQLite :class:`~achihuo_mini.backend.QueueBackend` with the registry, notifier and host-slot abilities.

    ``SqliteQueue(namespace, path=None, busy_timeout=30.0, poll_interval=0.05, synchronous="auto")``;
    ``path=None`` is ``$XDG_DATA_HOME/achihuo_mini/<NAME>.sqlite3``.
    """

    def shares_done_set(self, done: DoneSetBackend) -> bool:
        """True for a :class:`SqliteDoneSet` of the same file and namespace."""
        return isinstance(done, SqliteDoneSet) and done.path == self.path and done.namespace == self.namespace

    # -- push --------------------------------------------------------------------------

    async def push(self, tasks: Sequence[NewTask]) -> int:
        """Push a batch in one transaction; return how many were enqueued (unique duplicates skipped)."""
        if not tasks:
            return 0
        return self._woken(await self._call(self._t_push, list(tasks)))

    def _t_push(self, c: sqlite3.Connection, tasks: Sequence[NewTask]) -> int:
        delta = _Delta()
        n = self._insert(c, [tasks], delta)
        delta.write(c, self._ns)
        return n

    def _insert(self, c: sqlite3.Connection, groups: Sequence[Sequence[NewTask]], delta: _Delta) -> int:
        """Insert task groups as if pushed one group after the other; return how many.

        A unique task is skipped when its key is pending or done, or was accepted
        earlier in this call. The head tasks of a later group go before those of an
        earlier one (each group in its own order), where separate pushes put them.
        """
        ns = self._ns
        blocked = self._blocked(
            c,
            [t.key for group in groups for t in group if t.unique and t.key is not None],
        )
        pending: dict[bytes, int] = {}  # keys accepted in this call: pending from here on
        accepted: list[tuple[list[NewTask], int]] = []  # (tasks of a group, how many go to the head)
        heads = tails = 0
        for group in groups:
            kept: list[NewTask] = []
            group_heads = 0
            for t in group:
                key = t.key
                if key is not None:
                    if t.unique and (key in blocked or key in pending):
                        continue
                    pending[key] = pending.get(key, 0) + 1
                kept.append(t)
                if t.delay > 0:
                    pass
                elif t.head:
                    group_heads += 1
                else:
                    tails += 1
            if kept:
                accepted.append((kept, group_heads))
                heads += group_heads
        if not accepted:
            return 0
        head_end = head_start(c, ns) if heads else 0
        tail_pos = tail_end(c, ns) + 1 if tails else 0
        now = time.time()
        rows: list[tuple[int, bytes, bytes | None, int | None, float | None]] = []
        for kept, group_heads in accepted:
            head_end -= group_heads
            head_pos = head_end
            for t in kept:
                if t.delay > 0:
                    rows.append((ns, t.payload, t.key, None, now + t.delay))
                elif t.head:
                    rows.append((ns, t.payload, t.key, head_pos, None))
                    head_pos += 1
                else:
                    rows.append((ns, t.payload, t.key, tail_pos, None))
                    tail_pos += 1
        for n, params in _values(rows, 5):
            c.execute(_batch(BATCH_INSERT, n, "(?, ?, ?, ?, ?)"), params)
        if pending:
            for n, params in _values([(ns, key, count) for key, count in pending.items()], 3):
                c.execute(_batch(BATCH_PENDING_ADD, n, "(?, ?, ?)"), params)
        delta.ready += heads + tails
        delta.delayed += len(rows) - heads - tails
        return len(rows)

    def _blocked(self, c: sqlite3.Connection, keys: Sequence[bytes]) -> set[bytes]:
        """Those of ``keys`` that are pending or done (one statement, one row per chunk)."""
        ns = self._ns
        found: set[bytes] = set()
        if keys:
            now = time.time()
            for chunk in _chunks(list(dict.fromkeys(keys))):
                row = c.execute(_batch(BATCH_BLOCKED, len(chunk)), (ns, *chunk, ns, *chunk, now)).fetchone()
                if row[0] is not None:
                    found.update(map(bytes.fromhex, str(row[0]).split(",")))
        return found

    # -- reserve -----------------------------------------------------------------------

    async def reserve(self, worker: str, limit: int) -> list[Lease]:
        """Move due delayed tasks to the tail, then lease up to ``limit`` ready tasks, head first.

        A ready task that cannot be read (a payload that is not a BLOB, a key that is not a
        16-byte BLOB, an attempt or failure count that is not an integer) is moved to the
        dead letters with the reason as its error, instead of being leased.
        """
        if limit <= 0:
            return []
        return await self._call(self._t_reserve, worker, limit, mode="redo")

    def _t_reserve(self, c: sqlite3.Connection, worker: str, limit: int) -> list[Lease]:
        ns = self._ns
        delta = _Delta()
        due = [row[0] for row in c.execute(SQL_DUE, (ns, time.time(), PROMOTE_LIMIT))]
        if due:
            start = tail_end(c, ns) + 1
            c.executemany(
                "UPDATE tasks SET due = NULL, pos = ? WHERE id = ?",
                [(start + i, tid) for i, tid in enumerate(due)],
            )
            delta.delayed -= len(due)
            delta.ready += len(due)
        leases: list[Lease] = []
        buried = 0
        stored = _text(worker)
        while len(leases) < limit:
            want = limit - len(leases)
            rows = c.execute(SQL_READY, (ns, want)).fetchall()
            good: list[Lease] = []
            bad: list[tuple[int, Any, Any, Any, str]] = []
            for tid, payload, key, attempt, failures in rows:
                problem = task_problem(payload, key, attempt, failures)
                if problem is None:
                    good.append(Lease(tid, payload, key, worker, attempt + 1, failures))
                else:
                    bad.append((tid, payload, key, failures, problem))
            if good:
                for chunk in _chunks([lease.task_id for lease in good]):
                    c.execute(_batch(BATCH_LEASE, len(chunk)), (stored, *chunk))
                delta.ready -= len(good)
                delta.leased += len(good)
                leases += good
            if not bad:
                break
            self._bury_unreadable(c, bad, delta)
            buried += len(bad)
            if len(rows) < want or buried >= BURY_LIMIT:
                break
        delta.write(c, ns)
        return leases

    def _bury_unreadable(
        self, c: sqlite3.Connection, bad: Sequence[tuple[int, Any, Any, Any, str]], delta: _Delta
    ) -> None:
        """Move ready tasks that cannot be leased to the dead letters, the reason as their error."""
        rows = []
        for tid, payload, key, failures, problem in bad:
            log.warning(
                "SQLite %s: task %d of loop %r: %s; moved to the dead letters",
                self.location,
                tid,
                self.namespace,
                problem,
            )
            error = f"unreadable task: {problem}"
            blob_key = key if valid_key(key) else None
            rows.append((self._ns, tid, as_blob(payload), blob_key, error, failures if is_count(failures) else 0))
        c.executemany("INSERT INTO dead (ns, task_id, payload, key, error, failures) VALUES (?, ?, ?, ?, ?, ?)", rows)
        c.executemany("DELETE FROM tasks WHERE id = ?", [(tid,) for tid, *_ in bad])
        decrement_pending(c, self._ns, [key for _, _, key, _, _ in bad])
        delta.ready -= len(bad)
        delta.dead += len(bad)

    # -- commit ------------------------------------------------------------------------

    async def commit(self, commits: Sequence[Commit]) -> int:
        """Ack held leases, apply their done/undone keys and push their children, in one transaction."""
        if not commits:
            return 0
        applied, pushed = await self._call(self._t_commit, list(commits), mode="redo")
        self.children_pushed += pushed  # once the transaction is committed
        return self._woken(applied)

    children_pushed = 0
    """Children this object's commits enqueued (unique ones skipped as done or pending are not counted)."""

    def _t_commit(self, c: sqlite3.Connection, commits: Sequence[Commit]) -> tuple[int, int]:
        """Three phases (see ``QueueBackend.commit``), each a few set-based statements for the whole batch."""
        mask = self._held_mask(c, [commit.lease for commit in commits])
        applied = [commit for commit, held in zip(commits, mask, strict=True) if held]
        if not applied:
            return 0, 0
        delta = _Delta()
        # 1. every ack (a lease carries its task's key: the pending counts need no read)
        for chunk in _chunks([commit.lease.task_id for commit in applied]):
            c.execute(_batch(BATCH_ACK, len(chunk)), chunk)
        delta.leased -= len(applied)
        decrement_pending(c, self._ns, [commit.lease.key for commit in applied])
        # 2. every done-set change in commit order: the last change of a key wins
        changes: dict[bytes, bool | float] = {}  # False: removed, True: done for ever, a float: a ttl
        for commit in applied:
            for key in commit.undone:
                changes[key] = False
            for key in commit.done:
                changes[key] = True
            for key, ttl in commit.expiring:
                changes[key] = float(ttl)
        if changes:
            removed = [key for key, done in changes.items() if done is False]
            added = [key for key, done in changes.items() if done is True]
            expiring = [(key, ttl) for key, ttl in changes.items() if type(ttl) is float]
            if removed:
                remove_done(c, self._ns, removed, delta)
            if added:
                add_done(c, self._ns, added, delta)
            if expiring:
                add_expiring(c, self._ns, expiring, delta)
        # 3. every child in commit order
        groups = [commit.children for commit in applied if commit.children]
        pushed = self._insert(c, groups, delta) if groups else 0
        delta.write(c, self._ns)
        return len(applied), pushed

    def _held_mask(self, c: sqlite3.Connection, leases: Sequence[Lease]) -> list[bool]:
        """For each lease: still held, and the first in ``leases`` with its fencing token.

        One statement (and one row) per chunk. A repeated token is fenced: in sequential
        application the first one acks the task.
        """
        first: dict[tuple[int, str, int], int] = {}  # token -> index of its first lease
        for i, lease in enumerate(leases):
            first.setdefault((lease.task_id, _text(lease.worker), lease.attempt), i)
        mask = [False] * len(leases)
        for chunk in _chunks([(i, *token) for token, i in first.items()]):
            params = [*itertools.chain.from_iterable(chunk), self._ns]
            row = c.execute(_batch(BATCH_HELD, len(chunk), "(?, ?, ?, ?)"), params).fetchone()
            if row[0] is not None:
                for index in str(row[0]).split(","):
                    mask[int(index)] = True
        return mask

    def _held(self, c: sqlite3.Connection, lease: Lease) -> tuple[Any, Any, int] | None:
        """``(key, payload, failures)`` as stored when ``lease`` is still held, else None (fenced)."""
        row = c.execute(SQL_HELD, (lease.task_id, self._ns, _text(lease.worker), lease.attempt)).fetchone()
        return None if row is None else (row[0], row[1], row[2] if is_count(row[2]) else 0)

    # -- release, retry, bury ----------------------------------------------------------

    async def release(self, leases: Sequence[Lease], delay: float = 0.0) -> int:
        """Give held leases back without spending a failure; return how many were still held.

        ``delay <= 0`` (or NaN): to the head, in order. ``delay > 0``: ready at the tail
        after ``delay`` seconds, the failure count unchanged.
        """
        if not leases:
            return 0
        return self._woken(await self._call(self._t_release, list(leases), float(delay), mode="redo"))

    def _t_release(self, c: sqlite3.Connection, leases: Sequence[Lease], delay: float) -> int:
        held = list(dict.fromkeys(lease.task_id for lease in leases if self._held(c, lease) is not None))
        delta = _Delta()
        if delay > 0:
            due = time.time() + delay
            c.executemany(
                "UPDATE tasks SET worker = NULL, due = ? WHERE id = ?",
                [(due, tid) for tid in held],
            )
            delta.leased -= len(held)
            delta.delayed += len(held)
            n = len(held)
        else:
            n = to_head(c, self._ns, held, delta)
        delta.write(c, self._ns)
        return n

    async def retry(self, items: Sequence[tuple[Lease, float]]) -> int:
        """Count a failure and make each held task ready at the tail after its delay."""
        if not items:
            return 0
        return self._woken(await self._call(self._t_retry, list(items), mode="redo"))

    def _t_retry(self, c: sqlite3.Connection, items: Sequence[tuple[Lease, float]]) -> int:
        delta = _Delta()
        now = time.time()
        n = 0
        for lease, delay in items:
            if self._held(c, lease) is None:
                continue
            c.execute(
                "UPDATE tasks SET worker = NULL, due = ?, failures = failures + 1 WHERE id = ?",
                (now + (delay if delay > 0 else 0.0), lease.task_id),  # NaN counts as 0
            )
            n += 1
        delta.leased -= n
        delta.delayed += n
        delta.write(c, self._ns)
        return n

    async def bury(self, items: Sequence[tuple[Lease, str]]) -> int:
        """Move held tasks to the dead letters (error text cut to 2048 characters; counts a failure)."""
        if not items:
            return 0
        return await self._call(self._t_bury, list(items), mode="redo")

    def _t_bury(self, c: sqlite3.Connection, items: Sequence[tuple[Lease, str]]) -> int:
        delta = _Delta()
        n = 0
        keys: list[Any] = []
        for lease, error in items:
            held = self._held(c, lease)
            if held is None:
                continue
            key, payload, failures = held
            keys.append(key)
            text = _text(error[:ERROR_LIMIT])[:ERROR_LIMIT]
            c.execute(
                "INSERT INTO dead (ns, task_id, payload, key, error, failures) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    self._ns,
                    lease.task_id,
                    as_blob(payload),
                    key if valid_key(key) else None,
                    text,
                    failures + 1,
                ),
            )
            c.execute("DELETE FROM tasks WHERE id = ?", (lease.task_id,))
            n += 1
        decrement_pending(c, self._ns, keys)
        delta.leased -= n
        delta.dead += n
        delta.write(c, self._ns)
        return n

    # -- dead letters ------------------------------------------------------------------

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """Up to ``limit`` dead letters, oldest first (a damaged one as far as it can be read)."""
        if limit <= 0:
            return []
        return await self._call(self._t_dead_letters, limit, mode="read")

    def _t_dead_letters(self, c: sqlite3.Connection, limit: int) -> list[DeadLetter]:
        rows = c.execute(
            "SELECT id, task_id, payload, key, error, failures FROM dead WHERE ns = ? ORDER BY id LIMIT ?",
            (self._ns, limit),
        )
        letters = []
        for row_id, *fields in rows:
            letter, problems = dead_letter(*fields)
            if problems:
                log.warning(
                    "SQLite %s: dead letter %d of loop %r is damaged: %s",
                    self.location, row_id, self.namespace, "; ".join(problems),
                )  # fmt: skip
            letters.append(letter)
        return letters

    async def requeue_dead(self, limit: int | None = None) -> int:
        """Push up to ``limit`` (all when None) dead letters back to the ready tail, failures reset.

        A dead letter whose payload or key is damaged stays where it is, with a warning.
        """
        if limit is not None and limit <= 0:
            return 0
        return self._woken(await self._call(self._t_requeue_dead, limit))

    def _t_requeue_dead(self, c: sqlite3.Connection, limit: int | None) -> int:
        rows = c.execute("SELECT id, payload, key FROM dead WHERE ns = ? ORDER BY id", (self._ns,))
        chosen: list[tuple[int, bytes, bytes | None]] = []
        for row_id, payload, key in rows:
            problem = requeue_problem(payload, key)
            if problem is None:
                chosen.append((row_id, payload, key))
                if len(chosen) == limit:
                    break
            else:
                log.warning(
                    "SQLite %s: dead letter %d of loop %r stays: %s",
                    self.location,
                    row_id,
                    self.namespace,
                    problem,
                )
        rows.close()
        if not chosen:
            return 0
        c.executemany("DELETE FROM dead WHERE id = ?", [(row_id,) for row_id, _, _ in chosen])
        delta = _Delta()
        delta.dead -= len(chosen)
        n = self._insert(c, [[NewTask(payload, key) for _, payload, key in chosen]], delta)
        delta.write(c, self._ns)
        return n

    # -- stats and clear ---------------------------------------------------------------

    async def stats(self) -> QueueStats:
        """Ready, delayed, leased and dead counts in one snapshot (O(1): kept as counters)."""
        return await self._call(self._t_stats, mode="read")

    def _t_stats(self, c: sqlite3.Connection) -> QueueStats:
        ns = self._ns
        row = c.execute("SELECT ready, delayed, leased, dead FROM namespaces WHERE id = ?", (ns,)).fetchone()
        if row is None or not all(map(is_count, row)):
            log.warning(
                "SQLite %s: the counters of loop %r are damaged; counting the rows",
                self.location,
                self.namespace,
            )
            row = c.execute(
                "SELECT (SELECT count(*) FROM tasks WHERE ns = :ns AND pos IS NOT NULL),"
                " (SELECT count(*) FROM tasks WHERE ns = :ns AND due IS NOT NULL),"
                " (SELECT count(*) FROM tasks WHERE ns = :ns AND worker IS NOT NULL),"
                " (SELECT count(*) FROM dead WHERE ns = :ns)",
                {"ns": ns},
            ).fetchone()
        return QueueStats(ready=row[0], delayed=row[1], leased=row[2], dead=row[3])

    async def clear(self, what: Literal["queue", "dead"] = "queue") -> None:
        """``queue``: drop ready, delayed and leased tasks and pending counts. ``dead``: drop dead letters."""
        if what not in ("queue", "dead"):
            raise ValueError(f"clear() takes 'queue' or 'dead', not {what!r}")
        await self._call(self._t_clear, what)

    def _t_clear(self, c: sqlite3.Connection, what: str) -> None:
        ns = self._ns
        if what == "dead":
            c.execute("DELETE FROM dead WHERE ns = ?", (ns,))
            c.execute("UPDATE namespaces SET dead = 0 WHERE id = ?", (ns,))
            return
        c.execute("DELETE FROM tasks WHERE ns = ?", (ns,))
        c.execute("DELETE FROM pending WHERE ns = ?", (ns,))
        c.execute(
            "UPDATE namespaces SET ready = 0, delayed = 0, leased = 0 WHERE id = ?",
            (ns,),
        )
