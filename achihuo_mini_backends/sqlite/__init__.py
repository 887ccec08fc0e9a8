"""The ``sqlite`` backend: queue, done set and worker registry in one SQLite file.

Scope ``host``: every process on this machine that opens the same file shares the
data. It is the default backend: embedded, durable, no server.

Requirements and guarantees
---------------------------
- **SQLite 3.24.0 or newer** (``INSERT ... ON CONFLICT (...) DO UPDATE``, partial
  indexes, ``WITHOUT ROWID``). The version of the ``sqlite3`` library Python is
  linked against is checked at ``open()``, which refuses an older one.
  ``RETURNING`` (3.35) is not used.
- **Local disks only.** WAL mode needs shared memory between the processes and
  working POSIX locks; it does not work on NFS/SMB and silently corrupts there.
  POSIX locks belong to a process: code in the same process must not open and
  close the database file behind SQLite's back (nor a second copy of the SQLite
  library use it), or this process's locks are silently dropped.
- **WAL mode; every commit that a power loss could not redo is synced.** A commit that
  adds tasks (a feeder script's ``add_task``, ``run()``'s seeds, a re-queue of dead
  letters), marks names outside a handler, or carries a command syncs the WAL before it
  returns (``synchronous = FULL``): it survives a process crash (SIGKILL, OOM), an
  operating system crash and a power loss (on a disk that honours flushes). A commit
  whose loss only makes a worker redo work -- a handler's ack together with its
  children and done names, a reserve, a release, a retry, a burial, a heartbeat --
  is written with ``synchronous = NORMAL``: it survives a process crash as well, and
  reaches the disk with the next synced commit (syncing the WAL makes every earlier
  frame durable) or checkpoint. A power loss may roll such a commit back; the ack,
  the children and the done names go together (one transaction), so the task simply
  runs again: at-least-once holds. The queue reports ``durability: always``. The
  backend option ``synchronous = "full"`` syncs every commit (a power loss then never
  re-runs a finished handler, at a cost: ``benchmarks/crawl.py`` measures both).
- **Private files**: the file is created with mode ``0600``, and every folder the
  backend creates (the data folder, its parents) with ``0700``, whatever the umask;
  SQLite gives the ``-wal``/``-shm`` files the file's mode. Existing folders and
  files keep their modes.
- Every protocol operation is ONE transaction (``BEGIN IMMEDIATE`` for writers),
  so it is atomic across all processes using the file: two processes reserving
  at once never receive the same task.
- **Any number of processes may open one new file at the same moment.** The WAL
  switch and the schema transaction are retried while SQLite reports the file busy
  without waiting for it (which it does to avoid a deadlock), up to ``busy_timeout``;
  the schema is checked and created inside one ``BEGIN IMMEDIATE``.
- Nothing blocks the event loop: each backend instance owns one worker thread
  that creates, uses and closes its connection; lock waits (``busy_timeout``)
  happen in that thread. Connections of one process to one file also queue on a
  process-wide lock, so they do not spin in SQLite's busy-retry back-off.
- **Bad records cost themselves only.** Whatever is in the file may have been written
  by someone else: each operation checks the rows it reads before its first write
  (:mod:`.rows`). A ready task that cannot be leased goes to the dead letters with the
  reason; an unreadable registry entry is skipped with a warning (logger
  ``achihuo_mini.backends.sqlite``); no driver error, and no error from reading a
  damaged row, leaves a method except as :class:`~achihuo_mini.errors.BackendError`
  (``BackendUnavailable`` for a file that stays locked), the original chained.
- The clock is the host's ``time.time()`` (host scope: the host clock is the
  backend's clock): delayed tasks and worker heartbeats survive restarts.

Several loops may share one file (point them at the same ``path``): every row is
keyed by a namespace id from the ``namespaces`` table, and every index starts
with it. The schema carries ``PRAGMA user_version`` (refused when newer than
this code knows) and ``PRAGMA application_id`` (a foreign database is refused).

Schema (version 2, ``schema.sql``; a version 1 file is upgraded by ``migrate_2.sql`` in the
transaction that opens it)
----------------------------------------------------------------------------------------
``namespaces(id, name, ready, delayed, leased, dead, done)``
    one row per loop NAME (UTF-8 bytes), with the counters that make
    :meth:`SqliteQueue.stats` and :meth:`SqliteDoneSet.count` O(1); they are
    changed in the same transaction as the rows they count.
``tasks(id, ns, payload, key, pos, due, worker, attempt, failures)``
    every queued copy. Exactly one of ``pos`` (ready: position in the deque),
    ``due`` (delayed: unix time it becomes ready) and ``worker`` (leased: the
    holder) is set -- a CHECK constraint says so. ``id`` is AUTOINCREMENT, so a
    task id is never reused, even after a clear (fencing tokens stay unambiguous).
    Partial indexes ``(ns, pos)``, ``(ns, due)``, ``(ns, worker)`` make reserve,
    promotion and recovery O(limit log n).
``pending(ns, key, n)``, ``done(ns, key, expires)``
    per-key pending counts (rows with ``n = 0`` are deleted) and the done set; ``expires``
    is the unix time a name stops counting as done (``NULL``: for ever; names whose time has
    passed are swept a few at a time by each ``add_expiring``, via a partial index).
``dead(id, ns, task_id, payload, key, error, failures)``
    dead letters in burial order.
``workers(ns, worker, alias, role, info, last_seen, ttl)``, ``mailbox(id, ns, worker, command)``
    the worker registry (``info`` is JSON text) and the command mailboxes.
``host_slots(ns, host, worker, n, expires, waiting)``, ``host_turns(ns, host, next_start)``
    per-host slots held until ``expires`` and the next free request start of each host
    (the ``HostSlots`` ability, :mod:`.hosts`); rows past their times are deleted.

Modules
-------
``connection``  the worker thread, ``_call``, the per-file lock, opening, error translation
``statements``  hot-path SQL, batching of statements, the ready deque's positions
``rows``        checks for rows read back (untrusted)
``queue``       :class:`SqliteQueue`
``registry``    its worker registry and idle-wait notifier
``hosts``       its per-host slots (``HostSlots``)
``done``        :class:`SqliteDoneSet` (with ``ExpiringDoneSet``)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from achihuo_mini.plugins import BackendSpec, hookimpl

from .connection import (
    APPLICATION_ID,
    MIN_SQLITE_VERSION,
    OPTIONS,
    SCHEMA_VERSION,
    has_data,
    list_loops,
)
from .done import SqliteDoneSet
from .queue import BURY_LIMIT, ERROR_LIMIT, PROMOTE_LIMIT, SqliteQueue
from .statements import *  # noqa: F403 -- SQL_*, BATCH_*, CHUNK, _batch: the tests check their query plans

__all__ = [
    "APPLICATION_ID",
    "BURY_LIMIT",
    "ERROR_LIMIT",
    "MIN_SQLITE_VERSION",
    "OPTIONS",
    "PROMOTE_LIMIT",
    "SCHEMA_VERSION",
    "SqliteDoneSet",
    "SqliteQueue",
    "achihuo_register_backends",
]


def _options(options: Mapping[str, Any]) -> dict[str, Any]:
    return {name: options.get(name, option.default) for name, option in OPTIONS.items()}


def _create_queue(namespace: str, options: dict[str, Any]) -> SqliteQueue:
    return SqliteQueue(namespace, **_options(options))


def _create_done_set(namespace: str, options: dict[str, Any]) -> SqliteDoneSet:
    return SqliteDoneSet(namespace, **_options(options))


@hookimpl
def achihuo_register_backends(register: Callable[[BackendSpec], None]) -> None:
    """Register the ``sqlite`` backend (scope ``host``)."""
    register(
        BackendSpec(
            name="sqlite",
            scope="host",
            description="an SQLite file on a local disk; durable, no server, shared by the processes of one host",
            create_queue=_create_queue,
            create_done_set=_create_done_set,
            options=OPTIONS,
            list_loops=list_loops,
            has_data=lambda namespace, options: has_data(namespace, _options(options)),
        )
    )
