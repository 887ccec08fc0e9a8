"""The queue's optional abilities: the worker registry and the idle-wait notifier.

:class:`_Registry` is the base class of :class:`~achihuo_mini_backends.sqlite.SqliteQueue`
that implements :class:`~achihuo_mini.backend.WorkerRegistry` (tables ``workers`` and
``mailbox``) and :class:`~achihuo_mini.backend.Notifier`. Registry entries are read with
:mod:`.rows`: an entry that cannot be read is skipped with a warning, never an error.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from achihuo_mini.backend import COUNTS_LIMIT, Lease, WorkerInfo
from achihuo_mini.backend_kit import alias_order, counter_ok, lowest_free_alias, merge_counts

from .connection import _SqliteStore
from .rows import (
    is_number,
    liveness_problem,
    log,
    show,
    task_problem,
    valid_text,
    worker_entry,
)
from .statements import (
    SQL_ANY_READY,
    SQL_LEASED_BY,
    SQL_LEASES,
    SQL_NEXT_DUE,
    SQL_ORPHANS,
    _Delta,
    _text,
    tail_end,
    to_head,
)

_Waiter = tuple[asyncio.AbstractEventLoop, "asyncio.Future[None]"]
_WAITERS: dict[tuple[str, str], list[_Waiter]] = {}
_WAITERS_GUARD = threading.Lock()


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _wake(where: tuple[str, str]) -> None:
    """Wake the idle waiters of this process on one file and namespace."""
    with _WAITERS_GUARD:
        waiters = _WAITERS.pop(where, [])
    for loop, fut in waiters:
        if not loop.is_closed():
            loop.call_soon_threadsafe(_resolve, fut)


def _json(info: Mapping[str, Any]) -> str:
    """Worker info as JSON text (never pickle); ASCII, so any str survives."""
    return json.dumps(dict(info), ensure_ascii=True, separators=(",", ":"), allow_nan=False)


class _Registry(_SqliteStore):
    """WorkerRegistry and Notifier of :class:`SqliteQueue` (which adds the queue itself)."""

    def _woken(self, n: int) -> int:
        """Wake this process's idle waiters on the namespace when ``n`` tasks changed; return ``n``."""
        if n:
            _wake((self.location, self.namespace))
        return n

    # -- WorkerRegistry ----------------------------------------------------------------

    async def register(self, worker: str, role: str, info: Mapping[str, Any], ttl: float) -> str:
        """Register a new incarnation and claim the lowest free alias of its role, in one transaction."""
        return await self._call(self._t_register, _text(worker), role, _json(info), float(ttl), mode="redo")

    def _t_register(self, c: sqlite3.Connection, worker: str, role: str, info: str, ttl: float) -> str:
        ns = self._ns
        alias = lowest_free_alias(
            role,
            [row[0] for row in c.execute("SELECT alias FROM workers WHERE ns = ?", (ns,))],
        )
        self._forget_workers(c, [worker])
        c.execute(
            "INSERT INTO workers (ns, worker, alias, role, info, last_seen, ttl) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (ns, worker, alias, _text(role), info, time.time(), ttl),
        )
        return alias

    async def heartbeat(self, worker: str, info: Mapping[str, Any], ttl: float) -> list[str] | None:
        """Refresh liveness and info; return and clear pending commands (None: not registered)."""
        return await self._call(self._t_heartbeat, _text(worker), _json(info), float(ttl), mode="redo")

    def _t_heartbeat(self, c: sqlite3.Connection, worker: str, info: str, ttl: float) -> list[str] | None:
        ns = self._ns
        cur = c.execute(
            "UPDATE workers SET last_seen = ?, ttl = ?, info = ? WHERE ns = ? AND worker = ?",
            (time.time(), ttl, info, ns, worker),
        )
        if cur.rowcount == 0:
            return None
        rows = c.execute(
            "SELECT id, command FROM mailbox WHERE ns = ? AND worker = ? ORDER BY id",
            (ns, worker),
        ).fetchall()
        if rows:
            c.execute("DELETE FROM mailbox WHERE ns = ? AND worker = ?", (ns, worker))
        commands = []
        for mail_id, command in rows:
            if valid_text(command):
                commands.append(command)
            else:
                log.warning(
                    "SQLite %s: dropped command %s for worker %s of loop %r: it is not text",
                    self.location, mail_id, worker, self.namespace,
                )  # fmt: skip
        return commands

    def _forget_workers(self, c: sqlite3.Connection, workers: Sequence[str]) -> None:
        ns = self._ns
        c.executemany(
            "DELETE FROM workers WHERE ns = ? AND worker = ?",
            [(ns, w) for w in workers],
        )
        c.executemany(
            "DELETE FROM mailbox WHERE ns = ? AND worker = ?",
            [(ns, w) for w in workers],
        )

    async def unregister(self, worker: str) -> None:
        """Remove the worker, its alias and mailbox; release its leases to the head."""
        self._woken(await self._call(self._t_unregister, _text(worker), mode="redo"))

    def _t_unregister(self, c: sqlite3.Connection, worker: str) -> int:
        self._forget_workers(c, [worker])
        ids = [row[0] for row in c.execute(SQL_LEASED_BY, (self._ns, worker))]
        delta = _Delta()
        n = to_head(c, self._ns, ids, delta)
        delta.write(c, self._ns)
        return n

    # -- CounterStore ------------------------------------------------------------------

    async def add_counts(self, counts: Mapping[str, int]) -> None:
        """Add to the loop's counters in one transaction (``max/``, ``min/`` names keep the extreme)."""
        items = list(counts.items())
        merge_counts({}, dict(items))  # refuses bad names and values before anything is written
        if items:
            await self._call(self._t_add_counts, items, mode="redo")

    def _t_add_counts(self, c: sqlite3.Connection, items: list[tuple[str, int]]) -> None:
        for name, value in items:
            combine = "max(value, excluded.value)" if name.startswith("max/") else (
                "min(value, excluded.value)" if name.startswith("min/") else "value + excluded.value"
            )  # fmt: skip
            c.execute(
                "INSERT INTO counters (ns, name, value) VALUES (?, ?, ?) "
                f"ON CONFLICT (ns, name) DO UPDATE SET value = {combine}",
                (self._ns, name, value),
            )

    async def counts(self) -> dict[str, int]:
        """The loop's counters; a row that is not a short text name with an integer is skipped."""
        return await self._call(self._t_counts, mode="read")

    def _t_counts(self, c: sqlite3.Connection) -> dict[str, int]:
        found: dict[str, int] = {}
        skipped = 0
        rows = c.execute("SELECT name, value FROM counters WHERE ns = ? LIMIT ?", (self._ns, COUNTS_LIMIT))
        for name, value in rows:
            if counter_ok(name, value) and valid_text(name):
                found[name] = value
            else:
                skipped += 1
        if skipped:
            log.warning("SQLite %s: skipped %d unreadable counters of loop %r", self.location, skipped, self.namespace)
        return found

    async def clear_counts(self) -> None:
        await self._call(lambda c: c.execute("DELETE FROM counters WHERE ns = ?", (self._ns,)))

    async def workers(self) -> list[WorkerInfo]:
        """Registered workers (expired ones included until recovered), ordered by alias.

        An entry that cannot be read (info that is not a JSON object, a worker id, alias or
        role that is not text, a heartbeat time that is not a number) is left out, with a
        warning. An alias that is text but no alias (``s²``) is listed last.
        """
        return await self._call(self._t_workers, mode="read")

    def _t_workers(self, c: sqlite3.Connection) -> list[WorkerInfo]:
        now = time.time()
        found: list[WorkerInfo] = []
        rows = c.execute(
            "SELECT worker, alias, role, info, last_seen FROM workers WHERE ns = ?",
            (self._ns,),
        )
        for worker, alias, role, info, last_seen in rows:
            entry = worker_entry(worker, alias, role, info, last_seen, now)
            if isinstance(entry, str):
                log.warning(
                    "SQLite %s: skipped registry entry %s of loop %r: %s",
                    self.location, show(worker), self.namespace, entry,
                )  # fmt: skip
            else:
                found.append(entry)
        return sorted(found, key=lambda w: alias_order(w.alias))

    async def send(self, aliases: Sequence[str], command: str) -> list[str]:
        """Append ``command`` to the mailbox of each alias; return the aliases that exist."""
        if not aliases:
            return []
        return await self._call(self._t_send, list(aliases), _text(command))

    def _t_send(self, c: sqlite3.Connection, aliases: Sequence[str], command: str) -> list[str]:
        ns = self._ns
        found: set[str] = set()
        for alias in dict.fromkeys(aliases):
            row = c.execute(
                "SELECT worker FROM workers WHERE ns = ? AND alias = ?",
                (ns, _text(alias)),
            ).fetchone()
            if row is None:
                continue
            if not valid_text(row[0]):
                log.warning(
                    "SQLite %s: not sending to %s of loop %r: its registry entry has a worker id that is not text",
                    self.location, show(alias), self.namespace,
                )  # fmt: skip
                continue
            found.add(alias)
            c.execute(
                "INSERT INTO mailbox (ns, worker, command) VALUES (?, ?, ?)",
                (ns, row[0], command),
            )
        return [a for a in aliases if a in found]

    async def leases(self, worker: str) -> list[Lease]:
        """Every lease ``worker`` holds, oldest task first (a damaged one is left out, with a warning)."""
        return await self._call(self._t_leases, _text(worker), mode="read")

    def _t_leases(self, c: sqlite3.Connection, worker: str) -> list[Lease]:
        leases = []
        for tid, payload, key, attempt, failures in c.execute(SQL_LEASES, (self._ns, worker)):
            problem = task_problem(payload, key, attempt, failures)
            if problem is None:
                leases.append(Lease(tid, payload, key, worker, attempt, failures))
            else:
                log.warning(
                    "SQLite %s: left leased task %d of loop %r out of leases(): %s",
                    self.location, tid, self.namespace, problem,
                )  # fmt: skip
        return leases

    async def recover(self) -> int:
        """Unregister expired workers; release their leases and unregistered workers' leases to the head.

        An entry whose liveness cannot be read (a heartbeat time or ttl that is not a
        number, a worker id that is not text) counts as expired, with a warning: if its
        worker is alive, its next heartbeat finds it gone and it registers again. Delayed
        tasks whose due time is not a number (they would never be due) are made ready at
        the tail, where ``reserve`` checks them like any task.
        """
        return self._woken(await self._call(self._t_recover, mode="redo"))

    def _t_recover(self, c: sqlite3.Connection) -> int:
        ns = self._ns
        now = time.time()
        expired: list[str] = []
        unreadable: list[bytes] = []
        rows = c.execute(
            "SELECT CAST(worker AS BLOB), worker, last_seen, ttl FROM workers WHERE ns = ?",
            (ns,),
        )
        for handle, worker, last_seen, ttl in rows.fetchall():
            problem = liveness_problem(worker, last_seen, ttl)
            if problem is not None:
                log.warning(
                    "SQLite %s: registry entry %s of loop %r cannot be read (%s); recovered as expired",
                    self.location, show(worker), self.namespace, problem,
                )  # fmt: skip
                unreadable.append(handle)
            elif now - last_seen > ttl:
                expired.append(worker)
        self._forget_workers(c, expired)
        for table in ("workers", "mailbox"):
            c.executemany(
                f"DELETE FROM {table} WHERE ns = ? AND CAST(worker AS BLOB) = ?",
                [(ns, h) for h in unreadable],
            )
        delta = _Delta()
        n = to_head(c, ns, [row[0] for row in c.execute(SQL_ORPHANS, (ns, ns))], delta)
        never = [row[0] for row in c.execute("SELECT id FROM tasks WHERE ns = ? AND due > ?", (ns, float("inf")))]
        if never:
            log.warning(
                "SQLite %s: %d delayed tasks of loop %r had a due time that is not a number; made ready",
                self.location, len(never), self.namespace,
            )  # fmt: skip
            start = tail_end(c, ns) + 1
            c.executemany(
                "UPDATE tasks SET due = NULL, pos = ? WHERE id = ?",
                [(start + i, t) for i, t in enumerate(never)],
            )
            delta.delayed -= len(never)
            delta.ready += len(never)
        delta.write(c, ns)
        return n

    # -- Notifier ------------------------------------------------------------------------

    async def wait_for_tasks(self, timeout: float) -> None:
        """Return when tasks are ready or a delayed task is due, or after ``timeout`` seconds.

        Other processes cannot wake an SQLite reader, so this polls every
        ``poll_interval`` seconds (a cheap ``PRAGMA data_version`` check in the
        worker thread; the queries run only when the file changed). Pushes by any
        SqliteQueue of this process on the same file and namespace wake it at once.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.0)
        where = (self.location, self.namespace)
        while True:
            fut: asyncio.Future[None] = loop.create_future()
            entry = (loop, fut)
            with _WAITERS_GUARD:  # registered before probing, so a push after the probe wakes us
                _WAITERS.setdefault(where, []).append(entry)
            try:
                ready, due = await self._call(self._t_probe, mode="none")
                if ready:
                    return
                pause = min(self.poll_interval, deadline - loop.time())
                if due is not None:
                    pause = min(pause, due - time.time())
                if pause <= 0:
                    if due is not None and due <= time.time():
                        return
                    if deadline <= loop.time():
                        return
                    pause = 0.001
                try:
                    await asyncio.wait_for(fut, pause)
                    return
                except TimeoutError:
                    pass
            finally:
                with _WAITERS_GUARD:
                    waiters = _WAITERS.get(where)
                    if waiters is not None and entry in waiters:
                        waiters.remove(entry)
                        if not waiters:
                            del _WAITERS[where]

    def _t_probe(self, c: sqlite3.Connection) -> tuple[bool, float | None]:
        """(ready tasks exist, unix time the next delayed task is due); cached until the file changes."""
        version = int(c.execute("PRAGMA data_version").fetchone()[0])
        if self._probe_cache is not None and version == self._probe_version:
            return self._probe_cache
        ready = c.execute(SQL_ANY_READY, (self._ns,)).fetchone() is not None
        due = c.execute(SQL_NEXT_DUE, (self._ns,)).fetchone()[0]
        self._probe_version = version
        # numbers sort first: anything else is the only due time left, and never comes (recover() fixes it)
        self._probe_cache = (ready, float(due) if is_number(due) else None)
        return self._probe_cache
