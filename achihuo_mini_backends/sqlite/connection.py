"""Connection plumbing shared by the queue and the done set.

Each backend instance owns ONE worker thread that creates, uses and closes its
connection; coroutines hand work to it (:meth:`_SqliteStore._call`), so lock waits never
block the event loop. Writers of one file in one process also queue on a process-wide
lock (:func:`_file_lock`), so they do not spin in SQLite's busy back-off. Driver errors
and errors from reading damaged rows are translated here, at the boundary, into
:class:`~achihuo_mini.errors.BackendError` (``BackendUnavailable`` when waiting may help).

Opening is the one place where several processes meet a file that may not exist yet:
see :meth:`_SqliteStore._open_in_thread`.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.resources
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

from achihuo_mini.backend_kit import default_data_dir, private_dir, safe_filename
from achihuo_mini.errors import BackendError, BackendUnavailable, ConfigError
from achihuo_mini.masking import mask_secrets
from achihuo_mini.plugins import Option

from .rows import decode_text, log

MIN_SQLITE_VERSION = (3, 24, 0)
"""Oldest SQLite library this backend runs on (UPSERT with a conflict target)."""

SCHEMA_VERSION = 2
"""Stored in ``PRAGMA user_version``; a file with a newer version is refused, an older one upgraded."""

APPLICATION_ID = 0x4143484D
"""``PRAGMA application_id`` of an achihuo_mini database (ASCII ``ACHM``)."""

def _statements(file: str) -> tuple[str, ...]:
    """The statements of a ``.sql`` file of this package, in order (comment lines dropped)."""
    return tuple(
        statement.strip()
        for statement in "\n".join(
            line
            for line in importlib.resources.files(__package__).joinpath(file).read_text("utf-8").splitlines()
            if not line.lstrip().startswith("--")
        ).split(";")
        if statement.strip()
    )


SCHEMA: tuple[str, ...] = _statements("schema.sql")
"""The statements of ``schema.sql`` (package data): a new file's schema, version :data:`SCHEMA_VERSION`."""

MIGRATIONS: dict[int, tuple[str, ...]] = {2: _statements("migrate_2.sql")}
"""Version -> the statements that upgrade a file of the version before it (in one write transaction)."""

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
        minimum=0.0,
    ),
    "poll_interval": Option(
        float,
        0.05,
        "seconds between the checks an idle worker makes for new tasks (other processes cannot wake it)",
        minimum=0.0,
    ),
    "synchronous": Option(
        str,
        "auto",
        "'auto': commits that only lose work a worker redoes (a handler's ack, a reserve, a release, "
        "a heartbeat) sync at the next checkpoint, every other commit (adding tasks, task_done "
        "outside a handler, commands) syncs at once; 'full': every commit syncs at once",
    ),
}

SYNCHRONOUS = ("auto", "full")

_T = TypeVar("_T")

# SQLite primary result codes
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_SQLITE_IOERR = 10
_SQLITE_CORRUPT = 11
_SQLITE_FULL = 13
_SQLITE_CANTOPEN = 14
_SQLITE_PROTOCOL = 15
_SQLITE_NOTADB = 26
_UNAVAILABLE = {_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_IOERR, _SQLITE_FULL, _SQLITE_CANTOPEN, _SQLITE_PROTOCOL}

_DATA_ERRORS = (ValueError, TypeError, ArithmeticError, LookupError, RecursionError)
"""What reading a damaged row can raise in Python (json errors and UnicodeError are ValueErrors)."""

_FILE_LOCKS: dict[str, threading.Lock] = {}
_FILE_LOCKS_GUARD = threading.Lock()


def _file_lock(path: str) -> threading.Lock:
    """The process-wide lock that serialises this process's writers of one file."""
    with _FILE_LOCKS_GUARD:
        lock = _FILE_LOCKS.get(path)
        if lock is None:
            lock = _FILE_LOCKS[path] = threading.Lock()
        return lock


def _primary(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def _translate(exc: sqlite3.Error, where: str) -> BackendError:
    """A driver error as a :class:`BackendError` (``BackendUnavailable`` when it may pass)."""
    primary = _primary(exc)
    text = mask_secrets(str(exc))
    if primary in (_SQLITE_NOTADB, _SQLITE_CORRUPT) or "not a database" in text or "malformed" in text:
        return BackendError(f"SQLite {where}: not an SQLite database, or a corrupt one ({text})")
    if primary in _UNAVAILABLE or (primary is None and ("locked" in text or "busy" in text or "I/O" in text)):
        return BackendUnavailable(f"SQLite {where}: {text}")
    return BackendError(f"SQLite {where}: {text}")


def _retry_busy(deadline: float, step: Callable[[], _T]) -> _T:
    """Run ``step`` again while it fails with SQLITE_BUSY/LOCKED, until ``deadline`` (monotonic).

    SQLite does not always wait for a lock: a connection that already holds a read lock
    and asks for the write lock fails at once with SQLITE_BUSY, without calling the busy
    handler (waiting could deadlock). ``PRAGMA journal_mode = WAL`` on a new file does just
    that -- it reads the header, then writes it -- in every process that opens the file
    at the same moment, so all but one of them failed at once with "database is locked".
    """
    pause = 0.002
    while True:
        try:
            return step()
        except sqlite3.OperationalError as exc:
            if _primary(exc) not in (_SQLITE_BUSY, _SQLITE_LOCKED) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause * random.uniform(0.5, 1.5))  # in the backend's thread, never the event loop
        pause = min(pause * 2, 0.1)


class _SqliteStore:
    """Connection handling shared by the queue and the done set.

    The connection is created, used and closed only in this instance's single
    worker thread; coroutines hand work to it with ``run_in_executor``.
    """

    scope: Literal["host"] = "host"
    durability: Literal["always"] = "always"
    """Every commit that a power loss could not redo is synced (see ``synchronous``)."""

    def __init__(
        self,
        namespace: str,
        path: str | os.PathLike[str] | None = None,
        busy_timeout: float | None = 30.0,
        poll_interval: float | None = 0.05,
        synchronous: str | None = "auto",
    ) -> None:
        if path is None:
            path = default_data_dir() / (safe_filename(namespace) + ".sqlite3")
        busy_timeout = OPTIONS["busy_timeout"].default if busy_timeout is None else float(busy_timeout)
        poll_interval = OPTIONS["poll_interval"].default if poll_interval is None else float(poll_interval)
        if not busy_timeout >= 0:
            raise ConfigError(f"sqlite backend: busy_timeout must be >= 0 seconds, got {busy_timeout!r}")
        if not poll_interval > 0:
            raise ConfigError(f"sqlite backend: poll_interval must be > 0 seconds, got {poll_interval!r}")
        synchronous = OPTIONS["synchronous"].default if synchronous is None else synchronous
        if isinstance(synchronous, str):
            synchronous = synchronous.lower()  # SQLite spells its levels FULL, NORMAL
        if synchronous not in SYNCHRONOUS:
            raise ConfigError(f"sqlite backend: synchronous must be 'auto' or 'full', got {synchronous!r}")
        self.namespace = namespace
        self.synchronous: str = synchronous
        self._synced = True  # the connection's PRAGMA synchronous is FULL (False: NORMAL)
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

    async def open(self) -> None:
        """Create the folders (0700), file (0600) and schema when missing; connect in the worker thread.

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

    def _open_in_thread(self) -> None:
        """Create the file, switch it to WAL, create the schema and this loop's namespace.

        Any number of processes may do this on one new file at the same moment. The
        WAL switch and the schema transaction are retried while SQLite reports the
        file busy without waiting (see :func:`_retry_busy`), up to ``busy_timeout``;
        the schema is checked and created inside one ``BEGIN IMMEDIATE``, so exactly one
        process creates it and the others see it whole.
        """
        self._create_file()
        deadline = time.monotonic() + self.busy_timeout
        conn = sqlite3.connect(self.location, timeout=self.busy_timeout, isolation_level=None)
        try:
            conn.text_factory = decode_text
            _retry_busy(deadline, functools.partial(self._switch_to_wal, conn))
            conn.execute("PRAGMA synchronous = FULL")
            self._synced = True
            self._ns = _retry_busy(deadline, functools.partial(self._prepare, conn))
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _create_file(self) -> None:
        """Create the folders 0700 and the file 0600 (whatever the umask) when missing."""
        try:
            private_dir(self.path.parent)
            # Only ever with O_EXCL, under the process-wide lock of this path: closing ANY
            # descriptor of an open database drops every POSIX lock this process holds on
            # it, and another process could then delete the WAL index under our connections.
            with self._lock:
                try:
                    fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                except FileExistsError:
                    return
                try:
                    os.fchmod(fd, 0o600)  # the mode given to open() is filtered by the umask
                finally:
                    os.close(fd)
        except OSError as exc:
            raise BackendUnavailable(f"SQLite {self.location}: cannot create the database file: {exc}") from exc

    def _switch_to_wal(self, conn: sqlite3.Connection) -> None:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise BackendError(f"SQLite {self.location}: cannot switch to WAL mode (got {mode!r})")

    def _prepare(self, conn: sqlite3.Connection) -> int:
        """Check (and on a new file create) the schema and add this loop's namespace, in ONE write transaction."""
        return self._write(conn, self._prepare_in_transaction)

    def _prepare_in_transaction(self, conn: sqlite3.Connection) -> int:
        version = self._schema_version(conn)
        if version == 0:
            for statement in SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        elif version < SCHEMA_VERSION:  # an older file: upgraded in this same transaction
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[step]:
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            log.info("SQLite %s: upgraded the schema from version %d to %d", self.location, version, SCHEMA_VERSION)
        name = self.namespace.encode("utf-8", "surrogatepass")
        conn.execute("INSERT OR IGNORE INTO namespaces (name) VALUES (?)", (name,))
        return int(conn.execute("SELECT id FROM namespaces WHERE name = ?", (name,)).fetchone()[0])

    def _schema_version(self, conn: sqlite3.Connection) -> int:
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

    async def close(self) -> None:
        """Close the connection and stop the worker thread. Idempotent; data stays."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self._close_in_thread)
        finally:
            executor.shutdown(wait=False)

    def _is_connected(self) -> bool:
        return self._conn is not None

    def _close_in_thread(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    async def _call(
        self,
        fn: Callable[..., _T],
        *args: Any,
        mode: Literal["write", "redo", "read", "none", "open"] = "write",
    ) -> _T:
        """Run ``fn(connection, *args)`` in the worker thread; translate what it raises.

        ``write``: in one ``BEGIN IMMEDIATE`` transaction, synced to disk before this
        returns; ``redo``: the same, for a write whose loss only makes a worker redo work
        (a handler's ack with everything it wrote, a reserve, a release, a heartbeat):
        with ``synchronous = "auto"`` it is synced by the next synced write or
        checkpoint, so a power loss can roll it back -- and then the task runs again;
        ``read``: in one read transaction (a consistent snapshot); ``none``: no
        transaction.
        """
        executor = self._executor
        if executor is None:
            raise BackendError(f"{self!r} is not open (await open() first)")
        job = functools.partial(self._in_thread, fn, args, mode)
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, job)
        except sqlite3.Error as exc:
            raise _translate(exc, self.location) from exc
        except _DATA_ERRORS as exc:  # a damaged row that a check let through: still the backend's error
            text = mask_secrets(f"{type(exc).__name__}: {exc}")
            raise BackendError(f"SQLite {self.location}: unreadable data ({text})") from exc

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
        return self._write(conn, fn, *args, synced=mode == "write" or self.synchronous == "full")

    def _write(self, conn: sqlite3.Connection, fn: Callable[..., _T], *args: Any, synced: bool = True) -> _T:
        """``fn(conn, *args)`` in one write transaction (``BEGIN IMMEDIATE``), holding the per-file lock.

        ``synced``: the commit syncs the WAL (``PRAGMA synchronous = FULL``), which makes
        every earlier commit to the file durable too (the WAL is one sequence of frames);
        else it is left to the next synced commit or checkpoint (``NORMAL``). In WAL mode
        either keeps the file consistent through a power loss.
        """
        if not self._lock.acquire(timeout=self.busy_timeout):
            raise BackendUnavailable(
                f"SQLite {self.location}: still locked by this process after {self.busy_timeout} s"
            )
        try:
            if synced is not self._synced:
                conn.execute("PRAGMA synchronous = FULL" if synced else "PRAGMA synchronous = NORMAL")
                self._synced = synced
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn, *args)
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
        finally:
            self._lock.release()
            self._probe_cache = None  # our own commits do not change PRAGMA data_version
        return result


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # the original error is the one to report


# -- listing loops (``achihuo loops``) ---------------------------------------------------


async def list_loops(options: Mapping[str, Any]) -> list[str]:
    """The loops in the ``path`` file, or in every ``*.sqlite3`` file of the data folder."""
    path = options.get("path")
    files = [Path(path)] if path is not None else sorted(default_data_dir().glob("*.sqlite3"))
    return await asyncio.to_thread(_names_in, files)


async def has_data(namespace: str, options: Mapping[str, Any]) -> bool:
    """Whether the loop has tasks, dead letters, done names or workers in its file (read-only)."""
    path = options.get("path")
    file = Path(path) if path is not None else default_data_dir() / (safe_filename(namespace) + ".sqlite3")
    return await asyncio.to_thread(_has_data, file, namespace)


def _has_data(file: Path, namespace: str) -> bool:
    if not file.exists():
        return False
    try:  # read-only: asking never creates or changes a file
        conn = sqlite3.connect(f"{file.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error:
        return True  # it exists but cannot be read: opening it says why
    try:
        row = conn.execute(
            "SELECT id, ready + delayed + leased + dead + done FROM namespaces WHERE name = ?",
            (namespace.encode("utf-8", "surrogatepass"),),
        ).fetchone()
        if row is None:
            return False
        if type(row[1]) is not int or row[1] != 0:
            return True  # counted data, or counters it cannot trust
        if conn.execute("SELECT 1 FROM workers WHERE ns = ? LIMIT 1", (row[0],)).fetchone() is not None:
            return True
        try:
            return conn.execute("SELECT 1 FROM counters WHERE ns = ? LIMIT 1", (row[0],)).fetchone() is not None
        except sqlite3.OperationalError:
            return False  # a version-1 file: no statistics yet
    except sqlite3.Error:
        return True  # not ours, damaged or locked: opening it says which
    finally:
        conn.close()


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
            conn.text_factory = decode_text
            rows = conn.execute(  # the counters are exact: a cleared loop has none left
                "SELECT name FROM namespaces WHERE ready + delayed + leased + dead + done > 0"
            ).fetchall()
        except sqlite3.Error:
            continue  # not an achihuo_mini database, or locked for longer than 5 s
        finally:
            conn.close()
        for (name,) in rows:
            try:
                if type(name) is not bytes:
                    raise TypeError(type(name).__name__)
                names.add(name.decode("utf-8", "surrogatepass"))
            except (TypeError, UnicodeDecodeError):  # not a name this backend wrote
                log.warning("SQLite %s: skipped a namespace whose name is not UTF-8 bytes", file)
    return sorted(names)
