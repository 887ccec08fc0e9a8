"""The ``sqlite`` backend: queue, done set and worker registry in one SQLite file.

Scope ``host``: every process on this machine that opens the same file shares the
data. It is the default backend: embedded, durable, no server.

Requirements and guarantees
---------------------------
- **SQLite 3.24.0 or newer** (``INSERT ... ON CONFLICT (...) DO UPDATE``, partial
  indexes, ``WITHOUT ROWID``). The version of the ``sqlite3`` library Python is
  linked against is checked at :meth:`open`. ``RETURNING`` (3.35) is not used.
- **Local disks only.** WAL mode needs shared memory between the processes and
  working POSIX locks; it does not work on NFS/SMB and silently corrupts there.
  POSIX locks belong to a process: code in the same process must not open and
  close the database file behind SQLite's back (nor a second copy of the SQLite
  library use it), or this process's locks are silently dropped.
- The file is opened in WAL mode with ``synchronous=FULL``: a committed
  operation survives a power loss. The file and its folder are created when
  missing, the file with mode ``0600`` (the folder ``0700``); SQLite gives the
  ``-wal``/``-shm`` files the same mode.
- Every protocol operation is ONE transaction (``BEGIN IMMEDIATE`` for writers),
  so it is atomic across all processes using the file: two processes reserving
  at once never receive the same task.
- Nothing blocks the event loop: each backend instance owns one worker thread
  that creates, uses and closes its connection; lock waits (``busy_timeout``)
  happen in that thread. Connections of one process to one file also queue on a
  process-wide lock, so they do not spin in SQLite's busy-retry back-off.
- The clock is the host's ``time.time()`` (host scope: the host clock is the
  backend's clock): delayed tasks and worker heartbeats survive restarts.

Several loops may share one file (point them at the same ``path``): every row is
keyed by a namespace id from the ``namespaces`` table, and every index starts
with it. The schema carries ``PRAGMA user_version`` (refused when newer than
this code knows) and ``PRAGMA application_id`` (a foreign database is refused).

Schema (version 1)
------------------
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
``pending(ns, key, n)``, ``done(ns, key)``
    per-key pending counts (rows with ``n = 0`` are deleted) and the done set.
``dead(id, ns, task_id, payload, key, error, failures)``
    dead letters in burial order.
``workers(ns, worker, alias, role, info, last_seen, ttl)``, ``mailbox(id, ns, worker, command)``
    the worker registry (``info`` is JSON text) and the command mailboxes.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

from achihuo_mini.backend import (
    Commit,
    DeadLetter,
    DoneSetBackend,
    Lease,
    NewTask,
    QueueStats,
    WorkerInfo,
)
from achihuo_mini.errors import BackendError, BackendUnavailable, ConfigError
from achihuo_mini.plugins import BackendSpec, Option, default_data_dir, hookimpl, safe_filename

__all__ = [
    "MIN_SQLITE_VERSION",
    "OPTIONS",
    "SCHEMA_VERSION",
    "SqliteDoneSet",
    "SqliteQueue",
    "achihuo_register_backends",
]

MIN_SQLITE_VERSION = (3, 24, 0)
"""Oldest SQLite library this backend runs on (UPSERT with a conflict target)."""

SCHEMA_VERSION = 1
"""Stored in ``PRAGMA user_version``; a file with a newer version is refused."""

APPLICATION_ID = 0x4143484D
"""``PRAGMA application_id`` of an achihuo_mini database (ASCII ``ACHM``)."""

ERROR_LIMIT = 2048
"""Dead-letter error texts are cut to this many characters."""

PROMOTE_LIMIT = 10_000
"""At most this many due delayed tasks move to the tail in one ``reserve`` (bounds the transaction)."""

OPTIONS: dict[str, Option] = {
    "path": Option(
        Path,
        None,
        "database file (local disk only); default $XDG_DATA_HOME/achihuo_mini/<NAME>.sqlite3. "
        "Several loops may share one file.",
    ),
    "busy_timeout": Option(
        float,
        30.0,
        "seconds to wait for a lock held by another connection before the backend counts as unavailable",
    ),
    "poll_interval": Option(
        float,
        0.05,
        "seconds between the checks an idle worker makes for new tasks (other processes cannot wake it)",
    ),
}

_T = TypeVar("_T")

# SQLite primary result codes (sqlite3.SQLITE_* constants exist only from Python 3.11 on).
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_SQLITE_IOERR = 10
_SQLITE_CORRUPT = 11
_SQLITE_FULL = 13
_SQLITE_CANTOPEN = 14
_SQLITE_PROTOCOL = 15
_SQLITE_NOTADB = 26
_UNAVAILABLE = {_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_IOERR, _SQLITE_FULL, _SQLITE_CANTOPEN, _SQLITE_PROTOCOL}

_SCHEMA = """
CREATE TABLE namespaces (
    id       INTEGER PRIMARY KEY,
    name     BLOB NOT NULL UNIQUE,
    ready    INTEGER NOT NULL DEFAULT 0,
    delayed  INTEGER NOT NULL DEFAULT 0,
    leased   INTEGER NOT NULL DEFAULT 0,
    dead     INTEGER NOT NULL DEFAULT 0,
    done     INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE tasks (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    ns       INTEGER NOT NULL,
    payload  BLOB NOT NULL,
    key      BLOB,
    pos      INTEGER,
    due      REAL,
    worker   TEXT,
    attempt  INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    CHECK ((pos IS NOT NULL) + (due IS NOT NULL) + (worker IS NOT NULL) = 1)
);
CREATE INDEX tasks_ready ON tasks (ns, pos) WHERE pos IS NOT NULL;
CREATE INDEX tasks_delayed ON tasks (ns, due) WHERE due IS NOT NULL;
CREATE INDEX tasks_leased ON tasks (ns, worker) WHERE worker IS NOT NULL;
CREATE TABLE pending (
    ns  INTEGER NOT NULL,
    key BLOB NOT NULL,
    n   INTEGER NOT NULL,
    PRIMARY KEY (ns, key)
) WITHOUT ROWID;
CREATE TABLE done (
    ns  INTEGER NOT NULL,
    key BLOB NOT NULL,
    PRIMARY KEY (ns, key)
) WITHOUT ROWID;
CREATE TABLE dead (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    ns       INTEGER NOT NULL,
    task_id  INTEGER NOT NULL,
    payload  BLOB NOT NULL,
    key      BLOB,
    error    TEXT NOT NULL,
    failures INTEGER NOT NULL
);
CREATE INDEX dead_order ON dead (ns, id);
CREATE TABLE workers (
    ns        INTEGER NOT NULL,
    worker    TEXT NOT NULL,
    alias     TEXT NOT NULL,
    role      TEXT NOT NULL,
    info      TEXT NOT NULL,
    last_seen REAL NOT NULL,
    ttl       REAL NOT NULL,
    PRIMARY KEY (ns, worker),
    UNIQUE (ns, alias)
) WITHOUT ROWID;
CREATE TABLE mailbox (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    ns      INTEGER NOT NULL,
    worker  TEXT NOT NULL,
    command TEXT NOT NULL
);
CREATE INDEX mailbox_worker ON mailbox (ns, worker, id);
"""

# Hot-path statements (module constants so the tests can check their query plans).
SQL_READY = (
    "SELECT id, payload, key, attempt, failures FROM tasks WHERE ns = ? AND pos IS NOT NULL ORDER BY pos LIMIT ?"
)
SQL_DUE = "SELECT id FROM tasks WHERE ns = ? AND due IS NOT NULL AND due <= ? ORDER BY due, id LIMIT ?"
SQL_MIN_POS = "SELECT min(pos) FROM tasks WHERE ns = ? AND pos IS NOT NULL"
SQL_MAX_POS = "SELECT max(pos) FROM tasks WHERE ns = ? AND pos IS NOT NULL"
SQL_NEXT_DUE = "SELECT min(due) FROM tasks WHERE ns = ? AND due IS NOT NULL"
SQL_ANY_READY = "SELECT 1 FROM tasks WHERE ns = ? AND pos IS NOT NULL LIMIT 1"
SQL_HELD = "SELECT key, payload, failures FROM tasks WHERE id = ? AND ns = ? AND worker = ? AND attempt = ?"
SQL_LEASED_BY = "SELECT id, worker, attempt FROM tasks WHERE ns = ? AND worker = ? ORDER BY id"
SQL_ORPHANS = (
    "SELECT id, worker, attempt FROM tasks WHERE ns = ? AND worker IS NOT NULL "
    "AND worker NOT IN (SELECT worker FROM workers WHERE ns = ?) ORDER BY id"
)

# Set-based statements of the hot path (commit, push, reserve): one statement per chunk of
# up to CHUNK rows instead of one per task. Each ``{}`` becomes a list of rows; the row
# count is padded to a power of two (repeating a row where that changes nothing, or with
# all-NULL rows that ``WHERE column1 IS NOT NULL`` filters out), so a handful of texts per
# statement covers every batch size and they stay in the connection's statement cache.
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
    "UNION ALL SELECT key FROM done WHERE ns = ? AND key IN ({0}))"
)
BATCH_INSERT = "INSERT INTO tasks (ns, payload, key, pos, due) SELECT * FROM (VALUES {}) WHERE column1 IS NOT NULL"
BATCH_DONE_ADD = "INSERT OR IGNORE INTO done (ns, key) VALUES {}"
BATCH_DONE_REMOVE = "DELETE FROM done WHERE ns = ? AND key IN ({})"

_FILE_LOCKS: dict[str, threading.Lock] = {}
_FILE_LOCKS_GUARD = threading.Lock()

_Waiter = tuple[asyncio.AbstractEventLoop, "asyncio.Future[None]"]
_WAITERS: dict[tuple[str, str], list[_Waiter]] = {}
_WAITERS_GUARD = threading.Lock()


def _file_lock(path: str) -> threading.Lock:
    """The process-wide lock that serialises this process's writers of one file."""
    with _FILE_LOCKS_GUARD:
        lock = _FILE_LOCKS.get(path)
        if lock is None:
            lock = _FILE_LOCKS[path] = threading.Lock()
        return lock


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


def _translate(exc: sqlite3.Error, where: str) -> BackendError:
    """A driver error as a :class:`BackendError` (``BackendUnavailable`` when it may pass)."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    text = str(exc)
    if primary in (_SQLITE_NOTADB, _SQLITE_CORRUPT) or "not a database" in text or "malformed" in text:
        return BackendError(f"SQLite {where}: not an SQLite database, or a corrupt one ({text})")
    if primary in _UNAVAILABLE or (primary is None and ("locked" in text or "busy" in text or "I/O" in text)):
        return BackendUnavailable(f"SQLite {where}: {text}")
    return BackendError(f"SQLite {where}: {text}")


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


class _SqliteStore:
    """Connection handling shared by the queue and the done set.

    The connection is created, used and closed only in this instance's single
    worker thread; coroutines hand work to it with ``run_in_executor``.
    """

    scope: Literal["host"] = "host"

    def __init__(
        self,
        namespace: str,
        path: str | os.PathLike[str] | None = None,
        busy_timeout: float | None = 30.0,
        poll_interval: float | None = 0.05,
    ) -> None:
        if path is None:
            path = default_data_dir() / (safe_filename(namespace) + ".sqlite3")
        busy_timeout = OPTIONS["busy_timeout"].default if busy_timeout is None else float(busy_timeout)
        poll_interval = OPTIONS["poll_interval"].default if poll_interval is None else float(poll_interval)
        if not busy_timeout >= 0:
            raise ConfigError(f"sqlite backend: busy_timeout must be >= 0 seconds, got {busy_timeout!r}")
        if not poll_interval > 0:
            raise ConfigError(f"sqlite backend: poll_interval must be > 0 seconds, got {poll_interval!r}")
        self.namespace = namespace
        self.path = Path(os.path.expanduser(os.fspath(path))).resolve()
        self.location = str(self.path)
        self.busy_timeout: float = busy_timeout
        self.poll_interval: float = poll_interval
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None  # touched only in the worker thread
        self._ns = 0
        self._lock = _file_lock(self.location)
        self._probe_version: int | None = None
        self._probe_cache: tuple[bool, float | None] | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r}, namespace={self.namespace!r})"

    # -- thread plumbing ---------------------------------------------------

    async def open(self) -> None:
        """Create the folder, file (0600) and schema when missing; connect in the worker thread.

        Raises :class:`BackendError` for a file that is not an achihuo_mini
        database or has a newer schema, ``BackendUnavailable`` when it stays locked.
        """
        if self._executor is not None:  # open, or being opened by another coroutine: wait for that
            if not await self._call(self._is_connected, mode="open"):
                raise BackendError(f"{self!r}: opening failed in a concurrent open() call")
            return
        if sqlite3.sqlite_version_info < MIN_SQLITE_VERSION:
            need = ".".join(map(str, MIN_SQLITE_VERSION))
            raise BackendError(
                f"the sqlite backend needs SQLite {need} or newer; "
                f"Python's sqlite3 module uses {sqlite3.sqlite_version}"
            )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="achihuo-sqlite")
        try:
            await self._call(self._open_in_thread, mode="open")
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Close the connection and stop the worker thread. Idempotent; data stays."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self._close_in_thread)
        finally:
            executor.shutdown(wait=False)

    async def _call(
        self, fn: Callable[..., _T], *args: Any, mode: Literal["write", "read", "none", "open"] = "write"
    ) -> _T:
        """Run ``fn(connection, *args)`` in the worker thread.

        ``write``: in one ``BEGIN IMMEDIATE`` transaction; ``read``: in one read
        transaction (a consistent snapshot); ``none``: no transaction.
        """
        executor = self._executor
        if executor is None:
            raise BackendError(f"{self!r} is not open (await open() first)")
        job = functools.partial(self._in_thread, fn, args, mode)
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, job)
        except sqlite3.Error as exc:
            raise _translate(exc, self.location) from exc

    def _in_thread(self, fn: Callable[..., _T], args: tuple[Any, ...], mode: str) -> _T:
        if mode == "open":
            return fn(*args)
        conn = self._conn
        if conn is None:
            raise BackendError(f"{self!r} is closed")
        if mode == "none":
            return fn(conn, *args)
        if mode == "read":
            conn.execute("BEGIN")
            try:
                return fn(conn, *args)
            finally:
                conn.execute("COMMIT")
        if not self._lock.acquire(timeout=self.busy_timeout):
            raise BackendUnavailable(
                f"SQLite {self.location}: still locked by this process after {self.busy_timeout} s"
            )
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn, *args)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    try:
                        conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass  # the original error is the one to report
                raise
        finally:
            self._lock.release()
            self._probe_cache = None  # our own commits do not change PRAGMA data_version
        return result

    def _open_in_thread(self) -> None:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Create the file 0600 before SQLite does. Only ever with O_EXCL, under the
            # process-wide lock of this path: closing ANY descriptor of an open database
            # drops every POSIX lock this process holds on it, and another process could
            # then delete the WAL index under our open connections.
            with self._lock:
                try:
                    fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                except FileExistsError:
                    pass
                else:
                    os.close(fd)
        except OSError as exc:
            raise BackendUnavailable(f"SQLite {self.location}: cannot create the database file: {exc}") from exc
        conn = sqlite3.connect(self.location, timeout=self.busy_timeout, isolation_level=None)
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise BackendError(f"SQLite {self.location}: cannot switch to WAL mode (got {mode!r})")
            conn.execute("PRAGMA synchronous = FULL")
            self._prepare_schema(conn)
            name = self.namespace.encode("utf-8", "surrogatepass")
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("INSERT OR IGNORE INTO namespaces (name) VALUES (?)", (name,))
                self._ns = int(conn.execute("SELECT id FROM namespaces WHERE name = ?", (name,)).fetchone()[0])
                conn.execute("COMMIT")
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _prepare_schema(self, conn: sqlite3.Connection) -> None:
        def check() -> int:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            app = int(conn.execute("PRAGMA application_id").fetchone()[0])
            if app not in (0, APPLICATION_ID) or (
                app == 0 and conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            ):
                raise BackendError(
                    f"SQLite {self.location}: this file is a database of another application, "
                    "not an achihuo_mini one; choose another path"
                )
            if version > SCHEMA_VERSION:
                raise BackendError(
                    f"SQLite {self.location}: schema version {version} was written by a newer achihuo_mini; "
                    f"this one knows versions up to {SCHEMA_VERSION}. Upgrade achihuo_mini or use another path."
                )
            return version

        if check() == SCHEMA_VERSION:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            if check() == 0:  # nobody created it while we waited for the lock
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")

    def _is_connected(self) -> bool:
        return self._conn is not None

    def _close_in_thread(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    # -- helpers used inside transactions --------------------------------------

    def _add_done(self, c: sqlite3.Connection, keys: Sequence[bytes], delta: _Delta) -> int:
        ns = self._ns
        added = 0
        for chunk in _chunks(list(dict.fromkeys(keys))):
            params = [value for key in chunk for value in (ns, key)]
            added += max(c.execute(_batch(BATCH_DONE_ADD, len(chunk), "(?, ?)"), params).rowcount, 0)
        delta.done += added
        return added

    def _remove_done(self, c: sqlite3.Connection, keys: Sequence[bytes], delta: _Delta) -> int:
        ns = self._ns
        removed = 0
        for chunk in _chunks(list(dict.fromkeys(keys))):
            removed += max(c.execute(_batch(BATCH_DONE_REMOVE, len(chunk)), (ns, *chunk)).rowcount, 0)
        delta.done -= removed
        return removed


class SqliteQueue(_SqliteStore):
    """SQLite :class:`~achihuo_mini.backend.QueueBackend` with the registry and notifier abilities.

    ``SqliteQueue(namespace, path=None, busy_timeout=30.0, poll_interval=0.05)``;
    ``path=None`` is ``$XDG_DATA_HOME/achihuo_mini/<NAME>.sqlite3``.
    """

    def shares_done_set(self, done: DoneSetBackend) -> bool:
        """True for a :class:`SqliteDoneSet` of the same file and namespace."""
        return isinstance(done, SqliteDoneSet) and done.path == self.path and done.namespace == self.namespace

    # -- transaction bodies (worker thread) ------------------------------------

    def _insert(self, c: sqlite3.Connection, groups: Sequence[Sequence[NewTask]], delta: _Delta) -> int:
        """Insert task groups as if pushed one group after the other; return how many.

        A unique task is skipped when its key is pending or done, or was accepted
        earlier in this call. The head tasks of a later group go before those of an
        earlier one (each group in its own order), where separate pushes put them.
        """
        ns = self._ns
        blocked = self._blocked(c, [t.key for group in groups for t in group if t.unique and t.key is not None])
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
        head_end = self._min_pos(c) if heads else 0
        tail_pos = self._max_pos(c) + 1 if tails else 0
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
            for chunk in _chunks(list(dict.fromkeys(keys))):
                row = c.execute(_batch(BATCH_BLOCKED, len(chunk)), (ns, *chunk, ns, *chunk)).fetchone()
                if row[0] is not None:
                    found.update(map(bytes.fromhex, str(row[0]).split(",")))
        return found

    def _min_pos(self, c: sqlite3.Connection) -> int:
        low = c.execute(SQL_MIN_POS, (self._ns,)).fetchone()[0]
        if low is None:
            high = c.execute(SQL_MAX_POS, (self._ns,)).fetchone()[0]  # None too: ready is empty
            return 1 if high is None else int(high) + 1
        return int(low)

    def _max_pos(self, c: sqlite3.Connection) -> int:
        high = c.execute(SQL_MAX_POS, (self._ns,)).fetchone()[0]
        return 0 if high is None else int(high)

    def _decrement_pending(self, c: sqlite3.Connection, keys: Sequence[bytes | None]) -> None:
        """Drop one pending count per occurrence in ``keys`` (None: unnamed, nothing to count)."""
        ns = self._ns
        by_times: dict[int, list[bytes]] = {}
        for key, times in Counter(k for k in keys if k is not None).items():
            by_times.setdefault(times, []).append(key)
        for times, group in by_times.items():
            for i, chunk in enumerate(_chunks(group)):
                distinct = min(CHUNK, len(group) - i * CHUNK)
                # Rows whose count drops to zero go at once (usually all of them: n is 1)...
                dropped = c.execute(_batch(BATCH_PENDING_DROP, len(chunk)), (ns, times, *chunk)).rowcount
                if dropped < distinct:  # ...the others count down
                    c.execute(_batch(BATCH_PENDING_DEC, len(chunk)), (times, ns, *chunk))

    def _held(self, c: sqlite3.Connection, lease: Lease) -> tuple[bytes | None, bytes, int] | None:
        """``(key, payload, failures)`` when ``lease`` is still held, else None (fenced)."""
        row = c.execute(SQL_HELD, (lease.task_id, self._ns, _text(lease.worker), lease.attempt)).fetchone()
        return None if row is None else (row[0], row[1], int(row[2]))

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

    def _to_head(self, c: sqlite3.Connection, ids: Sequence[int], delta: _Delta) -> int:
        """Make leased tasks ``ids`` ready at the head, in this order."""
        if not ids:
            return 0
        start = self._min_pos(c) - len(ids)
        c.executemany(
            "UPDATE tasks SET worker = NULL, pos = ? WHERE id = ?", [(start + i, tid) for i, tid in enumerate(ids)]
        )
        delta.leased -= len(ids)
        delta.ready += len(ids)
        return len(ids)

    def _t_push(self, c: sqlite3.Connection, tasks: Sequence[NewTask]) -> int:
        delta = _Delta()
        n = self._insert(c, [tasks], delta)
        delta.write(c, self._ns)
        return n

    def _t_reserve(self, c: sqlite3.Connection, worker: str, limit: int) -> list[Lease]:
        ns = self._ns
        delta = _Delta()
        due = [row[0] for row in c.execute(SQL_DUE, (ns, time.time(), PROMOTE_LIMIT))]
        if due:
            start = self._max_pos(c) + 1
            c.executemany(
                "UPDATE tasks SET due = NULL, pos = ? WHERE id = ?", [(start + i, tid) for i, tid in enumerate(due)]
            )
            delta.delayed -= len(due)
            delta.ready += len(due)
        leases = [
            Lease(int(tid), payload, key, worker, int(attempt) + 1, int(failures))
            for tid, payload, key, attempt, failures in c.execute(SQL_READY, (ns, limit))
        ]
        if leases:
            stored = _text(worker)
            for chunk in _chunks([lease.task_id for lease in leases]):
                c.execute(_batch(BATCH_LEASE, len(chunk)), (stored, *chunk))
            delta.ready -= len(leases)
            delta.leased += len(leases)
        delta.write(c, ns)
        return leases

    def _t_commit(self, c: sqlite3.Connection, commits: Sequence[Commit]) -> int:
        """Three phases (see ``QueueBackend.commit``), each a few set-based statements for the whole batch."""
        mask = self._held_mask(c, [commit.lease for commit in commits])
        applied = [commit for commit, held in zip(commits, mask, strict=True) if held]
        if not applied:
            return 0
        delta = _Delta()
        # 1. every ack (a lease carries its task's key: the pending counts need no read)
        for chunk in _chunks([commit.lease.task_id for commit in applied]):
            c.execute(_batch(BATCH_ACK, len(chunk)), chunk)
        delta.leased -= len(applied)
        self._decrement_pending(c, [commit.lease.key for commit in applied])
        # 2. every done-set change in commit order: the last change of a key wins
        changes: dict[bytes, bool] = {}
        for commit in applied:
            for key in commit.undone:
                changes[key] = False
            for key in commit.done:
                changes[key] = True
        if changes:
            removed = [key for key, done in changes.items() if not done]
            added = [key for key, done in changes.items() if done]
            if removed:
                self._remove_done(c, removed, delta)
            if added:
                self._add_done(c, added, delta)
        # 3. every child in commit order
        groups = [commit.children for commit in applied if commit.children]
        if groups:
            self._insert(c, groups, delta)
        delta.write(c, self._ns)
        return len(applied)

    def _t_release(self, c: sqlite3.Connection, leases: Sequence[Lease]) -> int:
        held: list[int] = []
        seen: set[int] = set()
        for lease in leases:
            if lease.task_id not in seen and self._held(c, lease) is not None:
                seen.add(lease.task_id)
                held.append(lease.task_id)
        delta = _Delta()
        n = self._to_head(c, held, delta)
        delta.write(c, self._ns)
        return n

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

    def _t_bury(self, c: sqlite3.Connection, items: Sequence[tuple[Lease, str]]) -> int:
        delta = _Delta()
        n = 0
        keys: list[bytes | None] = []
        for lease, error in items:
            held = self._held(c, lease)
            if held is None:
                continue
            key, payload, failures = held
            keys.append(key)
            text = _text(error[:ERROR_LIMIT])[:ERROR_LIMIT]
            c.execute(
                "INSERT INTO dead (ns, task_id, payload, key, error, failures) VALUES (?, ?, ?, ?, ?, ?)",
                (self._ns, lease.task_id, payload, key, text, failures + 1),
            )
            c.execute("DELETE FROM tasks WHERE id = ?", (lease.task_id,))
            n += 1
        self._decrement_pending(c, keys)
        delta.leased -= n
        delta.dead += n
        delta.write(c, self._ns)
        return n

    def _t_dead_letters(self, c: sqlite3.Connection, limit: int) -> list[DeadLetter]:
        rows = c.execute(
            "SELECT task_id, payload, key, error, failures FROM dead WHERE ns = ? ORDER BY id LIMIT ?",
            (self._ns, limit),
        )
        return [DeadLetter(int(tid), payload, key, error, int(failures)) for tid, payload, key, error, failures in rows]

    def _t_requeue_dead(self, c: sqlite3.Connection, limit: int) -> int:
        rows = c.execute(
            "SELECT id, payload, key FROM dead WHERE ns = ? ORDER BY id LIMIT ?", (self._ns, limit)
        ).fetchall()
        if not rows:
            return 0
        c.executemany("DELETE FROM dead WHERE id = ?", [(row[0],) for row in rows])
        delta = _Delta()
        delta.dead -= len(rows)
        n = self._insert(c, [[NewTask(payload, key) for _, payload, key in rows]], delta)
        delta.write(c, self._ns)
        return n

    def _t_stats(self, c: sqlite3.Connection) -> QueueStats:
        row = c.execute("SELECT ready, delayed, leased, dead FROM namespaces WHERE id = ?", (self._ns,)).fetchone()
        return QueueStats(ready=int(row[0]), delayed=int(row[1]), leased=int(row[2]), dead=int(row[3]))

    def _t_clear(self, c: sqlite3.Connection, what: str) -> None:
        ns = self._ns
        if what == "dead":
            c.execute("DELETE FROM dead WHERE ns = ?", (ns,))
            c.execute("UPDATE namespaces SET dead = 0 WHERE id = ?", (ns,))
            return
        c.execute("DELETE FROM tasks WHERE ns = ?", (ns,))
        c.execute("DELETE FROM pending WHERE ns = ?", (ns,))
        c.execute("UPDATE namespaces SET ready = 0, delayed = 0, leased = 0 WHERE id = ?", (ns,))

    def _t_probe(self, c: sqlite3.Connection) -> tuple[bool, float | None]:
        """(ready tasks exist, unix time the next delayed task is due); cached until the file changes."""
        version = int(c.execute("PRAGMA data_version").fetchone()[0])
        if self._probe_cache is not None and version == self._probe_version:
            return self._probe_cache
        ready = c.execute(SQL_ANY_READY, (self._ns,)).fetchone() is not None
        due = c.execute(SQL_NEXT_DUE, (self._ns,)).fetchone()[0]
        self._probe_version = version
        self._probe_cache = (ready, None if due is None else float(due))
        return self._probe_cache

    # -- registry bodies ---------------------------------------------------------

    def _t_register(self, c: sqlite3.Connection, worker: str, role: str, info: str, ttl: float) -> str:
        ns = self._ns
        prefix = "m" if role == "master" else "s"
        taken = {row[0] for row in c.execute("SELECT alias FROM workers WHERE ns = ?", (ns,))}
        number = 1
        while f"{prefix}{number}" in taken:
            number += 1
        alias = f"{prefix}{number}"
        c.execute("DELETE FROM workers WHERE ns = ? AND worker = ?", (ns, worker))
        c.execute("DELETE FROM mailbox WHERE ns = ? AND worker = ?", (ns, worker))
        c.execute(
            "INSERT INTO workers (ns, worker, alias, role, info, last_seen, ttl) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (ns, worker, alias, _text(role), info, time.time(), ttl),
        )
        return alias

    def _t_heartbeat(self, c: sqlite3.Connection, worker: str, info: str, ttl: float) -> list[str] | None:
        ns = self._ns
        cur = c.execute(
            "UPDATE workers SET last_seen = ?, ttl = ?, info = ? WHERE ns = ? AND worker = ?",
            (time.time(), ttl, info, ns, worker),
        )
        if cur.rowcount == 0:
            return None
        rows = c.execute("SELECT id, command FROM mailbox WHERE ns = ? AND worker = ? ORDER BY id", (ns, worker))
        commands = rows.fetchall()
        if commands:
            c.execute("DELETE FROM mailbox WHERE ns = ? AND worker = ?", (ns, worker))
        return [str(command) for _, command in commands]

    def _forget_workers(self, c: sqlite3.Connection, workers: Sequence[str]) -> None:
        ns = self._ns
        c.executemany("DELETE FROM workers WHERE ns = ? AND worker = ?", [(ns, w) for w in workers])
        c.executemany("DELETE FROM mailbox WHERE ns = ? AND worker = ?", [(ns, w) for w in workers])

    def _t_unregister(self, c: sqlite3.Connection, worker: str) -> int:
        self._forget_workers(c, [worker])
        ids = [row[0] for row in c.execute(SQL_LEASED_BY, (self._ns, worker))]
        delta = _Delta()
        n = self._to_head(c, ids, delta)
        delta.write(c, self._ns)
        return n

    def _t_workers(self, c: sqlite3.Connection) -> list[WorkerInfo]:
        now = time.time()
        rows = c.execute("SELECT worker, alias, role, info, last_seen FROM workers WHERE ns = ?", (self._ns,))
        found = [
            WorkerInfo(worker, alias, role, json.loads(info), max(now - last_seen, 0.0))
            for worker, alias, role, info, last_seen in rows
        ]
        return sorted(found, key=_alias_order)

    def _t_send(self, c: sqlite3.Connection, aliases: Sequence[str], command: str) -> list[str]:
        ns = self._ns
        found: dict[str, str] = {}
        for alias in dict.fromkeys(aliases):
            row = c.execute("SELECT worker FROM workers WHERE ns = ? AND alias = ?", (ns, _text(alias))).fetchone()
            if row is not None:
                found[alias] = row[0]
                c.execute("INSERT INTO mailbox (ns, worker, command) VALUES (?, ?, ?)", (ns, row[0], command))
        return [a for a in aliases if a in found]

    def _t_recover(self, c: sqlite3.Connection) -> int:
        ns = self._ns
        now = time.time()
        rows = c.execute("SELECT worker FROM workers WHERE ns = ? AND ? - last_seen > ttl", (ns, now))
        expired = [row[0] for row in rows]
        if expired:
            self._forget_workers(c, expired)
        ids = [row[0] for row in c.execute(SQL_ORPHANS, (ns, ns))]
        delta = _Delta()
        n = self._to_head(c, ids, delta)
        delta.write(c, ns)
        return n

    # -- protocol ------------------------------------------------------------------

    def _woken(self, n: int) -> int:
        if n:
            _wake((self.location, self.namespace))
        return n

    async def push(self, tasks: Sequence[NewTask]) -> int:
        """Push a batch in one transaction; return how many were enqueued (unique duplicates skipped)."""
        if not tasks:
            return 0
        return self._woken(await self._call(self._t_push, list(tasks)))

    async def reserve(self, worker: str, limit: int) -> list[Lease]:
        """Move due delayed tasks to the tail, then lease up to ``limit`` ready tasks, head first."""
        if limit <= 0:
            return []
        return await self._call(self._t_reserve, worker, limit)

    async def commit(self, commits: Sequence[Commit]) -> int:
        """Ack held leases, apply their done/undone keys and push their children, in one transaction."""
        if not commits:
            return 0
        return self._woken(await self._call(self._t_commit, list(commits)))

    async def release(self, leases: Sequence[Lease]) -> int:
        """Return held leases to the head, in order, without spending a failure."""
        if not leases:
            return 0
        return self._woken(await self._call(self._t_release, list(leases)))

    async def retry(self, items: Sequence[tuple[Lease, float]]) -> int:
        """Count a failure and make each held task ready at the tail after its delay."""
        if not items:
            return 0
        return self._woken(await self._call(self._t_retry, list(items)))

    async def bury(self, items: Sequence[tuple[Lease, str]]) -> int:
        """Move held tasks to the dead letters (error text cut to 2048 characters; counts a failure)."""
        if not items:
            return 0
        return await self._call(self._t_bury, list(items))

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """Up to ``limit`` dead letters, oldest first."""
        if limit <= 0:
            return []
        return await self._call(self._t_dead_letters, limit, mode="read")

    async def requeue_dead(self, limit: int | None = None) -> int:
        """Push up to ``limit`` (all when None) dead letters back to the ready tail, failures reset."""
        if limit is not None and limit <= 0:
            return 0
        return self._woken(await self._call(self._t_requeue_dead, -1 if limit is None else limit))

    async def stats(self) -> QueueStats:
        """Ready, delayed, leased and dead counts in one snapshot (O(1): kept as counters)."""
        return await self._call(self._t_stats, mode="read")

    async def clear(self, what: Literal["queue", "dead"] = "queue") -> None:
        """``queue``: drop ready, delayed and leased tasks and pending counts. ``dead``: drop dead letters."""
        if what not in ("queue", "dead"):
            raise ValueError(f"clear() takes 'queue' or 'dead', not {what!r}")
        await self._call(self._t_clear, what)

    # -- WorkerRegistry ----------------------------------------------------------------

    async def register(self, worker: str, role: str, info: Mapping[str, Any], ttl: float) -> str:
        """Register a new incarnation and claim the lowest free alias of its role, in one transaction."""
        return await self._call(self._t_register, _text(worker), role, _json(info), float(ttl))

    async def heartbeat(self, worker: str, info: Mapping[str, Any], ttl: float) -> list[str] | None:
        """Refresh liveness and info; return and clear pending commands (None: not registered)."""
        return await self._call(self._t_heartbeat, _text(worker), _json(info), float(ttl))

    async def unregister(self, worker: str) -> None:
        """Remove the worker, its alias and mailbox; release its leases to the head."""
        self._woken(await self._call(self._t_unregister, _text(worker)))

    async def workers(self) -> list[WorkerInfo]:
        """Registered workers (expired ones included until recovered), ordered by alias."""
        return await self._call(self._t_workers, mode="read")

    async def send(self, aliases: Sequence[str], command: str) -> list[str]:
        """Append ``command`` to the mailbox of each alias; return the aliases that exist."""
        if not aliases:
            return []
        return await self._call(self._t_send, list(aliases), _text(command))

    async def leases(self, worker: str) -> list[Lease]:
        """Every lease ``worker`` holds, oldest task first."""
        return await self._call(self._t_leases, _text(worker), mode="read")

    def _t_leases(self, c: sqlite3.Connection, worker: str) -> list[Lease]:
        rows = c.execute(
            "SELECT id, payload, key, attempt, failures FROM tasks WHERE ns = ? AND worker = ? ORDER BY id",
            (self._ns, worker),
        )
        return [
            Lease(int(tid), payload, key, worker, int(attempt), int(failures))
            for tid, payload, key, attempt, failures in rows
        ]

    async def recover(self) -> int:
        """Unregister expired workers; release their leases and unregistered workers' leases to the head."""
        return self._woken(await self._call(self._t_recover))

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


class SqliteDoneSet(_SqliteStore):
    """SQLite :class:`~achihuo_mini.backend.DoneSetBackend`: the ``done`` table of one namespace.

    ``SqliteDoneSet(namespace, path=None, busy_timeout=30.0, poll_interval=0.05)``.
    """

    def _t_add(self, c: sqlite3.Connection, keys: Sequence[bytes]) -> int:
        delta = _Delta()
        n = self._add_done(c, keys, delta)
        delta.write(c, self._ns)
        return n

    def _t_remove(self, c: sqlite3.Connection, keys: Sequence[bytes]) -> int:
        delta = _Delta()
        n = self._remove_done(c, keys, delta)
        delta.write(c, self._ns)
        return n

    def _t_contains(self, c: sqlite3.Connection, keys: Sequence[bytes]) -> list[bool]:
        ns = self._ns
        found: set[bytes] = set()
        distinct = list(dict.fromkeys(keys))
        for i in range(0, len(distinct), 500):
            chunk = distinct[i : i + 500]
            marks = ",".join("?" * len(chunk))
            found.update(
                row[0] for row in c.execute(f"SELECT key FROM done WHERE ns = ? AND key IN ({marks})", (ns, *chunk))
            )
        return [k in found for k in keys]

    def _t_count(self, c: sqlite3.Connection) -> int:
        return int(c.execute("SELECT done FROM namespaces WHERE id = ?", (self._ns,)).fetchone()[0])

    def _t_clear(self, c: sqlite3.Connection) -> None:
        c.execute("DELETE FROM done WHERE ns = ?", (self._ns,))
        c.execute("UPDATE namespaces SET done = 0 WHERE id = ?", (self._ns,))

    async def add(self, keys: Sequence[bytes]) -> int:
        """Add keys; return how many were new."""
        if not keys:
            return 0
        return await self._call(self._t_add, list(keys))

    async def contains(self, keys: Sequence[bytes]) -> list[bool]:
        """Membership of each key, in order."""
        if not keys:
            return []
        return await self._call(self._t_contains, list(keys), mode="read")

    async def remove(self, keys: Sequence[bytes]) -> int:
        """Remove keys; return how many were present."""
        if not keys:
            return 0
        return await self._call(self._t_remove, list(keys))

    async def count(self) -> int:
        """Number of keys in the set (O(1): a counter kept with the rows)."""
        return await self._call(self._t_count, mode="read")

    async def clear(self) -> None:
        """Remove every key of this namespace."""
        await self._call(self._t_clear)


def _json(info: Mapping[str, Any]) -> str:
    """Worker info as JSON text (never pickle); ASCII, so any str survives."""
    return json.dumps(dict(info), ensure_ascii=True, separators=(",", ":"), allow_nan=False)


def _alias_order(w: WorkerInfo) -> tuple[str, int, str]:
    prefix, number = w.alias[:1], w.alias[1:]
    return (prefix, int(number) if number.isdigit() else 0, w.alias)


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
            list_loops=_list_loops,
        )
    )


async def _list_loops(options: Mapping[str, Any]) -> list[str]:
    """The loops in the ``path`` file, or in every ``*.sqlite3`` file of the data folder."""
    path = options.get("path")
    files = [Path(path)] if path is not None else sorted(default_data_dir().glob("*.sqlite3"))
    return await asyncio.to_thread(_names_in, files)


def _names_in(files: Sequence[Path]) -> list[str]:
    names: set[str] = set()
    for file in files:
        if not file.is_file():
            continue
        try:  # read-only: listing never creates or changes a file
            conn = sqlite3.connect(f"{file.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)
        except sqlite3.Error:
            continue
        try:
            rows = conn.execute(  # the counters are exact: a cleared loop has none left
                "SELECT name FROM namespaces WHERE ready + delayed + leased + dead + done > 0"
            ).fetchall()
        except sqlite3.DatabaseError:
            continue  # not an achihuo_mini database
        finally:
            conn.close()
        names.update(bytes(row[0]).decode("utf-8", "surrogatepass") for row in rows)
    return sorted(names)
