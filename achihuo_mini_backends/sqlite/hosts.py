"""The queue's per-host slots: :class:`~achihuo_mini.backend.HostSlots` in tables ``host_slots`` and ``host_turns``.

``host_slots(ns, host, worker, n, expires, waiting)``: the slots a worker holds of a host
until ``expires`` (unix time), and until when it counts as waiting for more. A holding
past ``expires`` counts for nothing; rows past both times are deleted by the next call.
``host_turns(ns, host, next_start)``: the host's next free request start, deleted once it
has passed. Every call is one ``BEGIN IMMEDIATE`` transaction; the clock is the host's
``time.time()``. Rows read back are checked (:mod:`.rows`): a count that is not a count
counts as 0, a time that is not a number as passed.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence

from achihuo_mini.backend import HostAsk, HostGrant

from .connection import _SqliteStore
from .rows import is_count, is_number
from .statements import _text

MAX_AHEAD = 86400.0
"""A stored next start further ahead than this (seconds) is not one the loop could have written: ignored."""


class _HostSlots(_SqliteStore):
    """Mixin of :class:`~achihuo_mini_backends.sqlite.SqliteQueue`: the ``HostSlots`` ability."""

    async def claim_hosts(self, worker: str, asks: Sequence[HostAsk], ttl: float, wait: float) -> list[HostGrant]:
        """Release, take slots and reserve turns for each ask, in one transaction (see ``HostSlots``)."""
        if not asks:
            return []
        return await self._call(self._t_claim_hosts, worker, list(asks), float(ttl), float(wait), mode="redo")

    def _t_claim_hosts(
        self, c: sqlite3.Connection, worker: str, asks: Sequence[HostAsk], ttl: float, wait: float
    ) -> list[HostGrant]:
        ns = self._ns
        now = time.time()
        c.execute("DELETE FROM host_slots WHERE ns = ? AND expires <= ? AND waiting <= ?", (ns, now, now))
        c.execute("DELETE FROM host_turns WHERE ns = ? AND next_start <= ?", (ns, now))
        me = _text(worker)
        return [self._claim(c, ns, me, ask, now, ttl, wait) for ask in asks]

    def _claim(
        self, c: sqlite3.Connection, ns: int, me: str, ask: HostAsk, now: float, ttl: float, wait: float
    ) -> HostGrant:
        host = _text(ask.host)
        others = workers = 0
        held, waiting = 0, 0.0
        rows = c.execute("SELECT worker, n, expires, waiting FROM host_slots WHERE ns = ? AND host = ?", (ns, host))
        for who, n, expires, until in rows:
            n = n if is_count(n) and is_number(expires) and expires > now else 0
            until = until if is_number(until) else 0.0
            if who == me:
                held, waiting = n, until
            elif n or until > now:
                others += n
                workers += 1
        held -= min(max(ask.release, 0), held)
        granted = 0
        if ask.slots > 0:
            free = max(ask.limit - others - held, 0) if ask.limit > 0 else ask.slots
            granted = min(ask.slots, free)
            held += granted
            waiting = now + wait if granted < ask.slots else 0.0
        if held or waiting > now:
            workers += 1
            c.execute(
                "INSERT INTO host_slots (ns, host, worker, n, expires, waiting) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (ns, host, worker) DO UPDATE SET n = excluded.n, expires = excluded.expires, "
                "waiting = excluded.waiting",
                (ns, host, me, held, now + ttl, waiting),
            )
        else:
            c.execute("DELETE FROM host_slots WHERE ns = ? AND host = ? AND worker = ?", (ns, host, me))
        start, turns = 0.0, max(ask.turns, 0)
        if turns and ask.delay > 0:
            row = c.execute("SELECT next_start FROM host_turns WHERE ns = ? AND host = ?", (ns, host)).fetchone()
            stored = row[0] if row is not None and is_number(row[0]) else now
            first = max(now, stored) if stored <= now + MAX_AHEAD else now  # a start a day ahead is garbage
            c.execute(
                "INSERT INTO host_turns (ns, host, next_start) VALUES (?, ?, ?) "
                "ON CONFLICT (ns, host) DO UPDATE SET next_start = excluded.next_start",
                (ns, host, first + turns * ask.delay),
            )
            start = first - now
        return HostGrant(granted, held, max(workers, 1), start, turns)
