"""The journal of one namespace directory, shared by the processes of one host.

Files in the directory (created 0700, files 0600):

``lock``
    empty; every operation holds ``fcntl.flock(LOCK_EX)`` on it. It is never
    replaced, so every process locks the same inode.
``journal``
    ``MAGIC``, then records, each framed as ``>II`` (body length, crc32 of body)
    + a msgpack body (see :mod:`achihuo_filestore.state`). The first record is a
    snapshot; the others are appended. Readers stop at the first frame that is
    short or fails its checksum: it is the tail of a write that crashed before its
    fsync, was never acknowledged, and is cut off by the next operation.

An operation: lock -> catch up (replay what other processes appended since our
last read; reload everything when a compaction replaced the file) -> decide and
apply in memory -> append + fsync -> unlock. When the journal has grown past
``compact_bytes`` and to twice its size after the last compaction, the process
holding the lock writes a fresh snapshot to ``journal.tmp``, fsyncs it and
renames it over ``journal``. Other processes notice the new inode at their next
operation. Every method here runs in the store's single worker thread.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from achihuo_mini.backend_kit import private_dir
from achihuo_mini.errors import BackendError, BackendUnavailable

from .state import Record, State, pack, unpack

__all__ = ["MAGIC", "Journal", "acquire", "release"]

MAGIC = b"ACHFSJ1\n"
"""First 8 bytes of a journal file; the digit is the format version."""

_FRAME = struct.Struct(">II")
_T = TypeVar("_T")
log = logging.getLogger("achihuo_filestore")


class Journal:
    """One namespace directory opened by this process (shared by its queue and done set instances)."""

    def __init__(self, directory: Path, namespace: str, lock_timeout: float, compact_bytes: int) -> None:
        self.directory = directory
        self.namespace = namespace
        self.lock_timeout = lock_timeout
        self.compact_bytes = compact_bytes
        self.path = directory / "journal"
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="achihuo-filestore")
        self.refs = 0
        self.state = State()
        self._lock_fd = -1
        self._fd = -1  # the journal file we have read, O_APPEND
        self._ident = (0, 0)  # (st_dev, st_ino) of that file
        self._offset = 0  # bytes of it replayed (and known good)
        self._base = 0  # its size right after its snapshot was written
        self._stale = True  # in-memory state may not match the file: reload at the next operation

    # -- public, called in the worker thread ------------------------------------------

    def open(self) -> None:
        if self._lock_fd >= 0:
            return
        if not self.directory.is_dir():
            private_dir(self.directory)  # every folder it creates 0700, whatever the umask
            _fsync_dir(self.directory.parent)
        self._lock_fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            self.read(lambda state: None)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for fd in (self._fd, self._lock_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._lock_fd = -1
        self._stale = True

    def write(self, decide: Callable[[State, float], tuple[_T, Record | None]]) -> _T:
        """Run ``decide(state, time.time())`` under the lock; append and fsync its record."""
        with self._locked():
            try:
                result, record = decide(self.state, time.time())
                if record is not None:
                    self._append(record)
            except BaseException:
                self._stale = True  # memory may hold a change the journal does not
                raise
            if self._offset > self._base and self._offset >= max(self.compact_bytes, 2 * self._base):
                try:
                    self._compact()
                except OSError as exc:  # the operation itself is durable already
                    log.warning("filestore %s: compaction failed: %s", self.path, exc)
                    self._stale = True
            return result

    def read(self, query: Callable[[State], _T]) -> _T:
        """``query(state)`` on a state caught up under the lock (one consistent snapshot)."""
        with self._locked():
            return query(self.state)

    def probe(self) -> tuple[bool, float | None]:
        """(ready tasks exist, unix time the next delayed task is due); locks only if the file changed."""
        st = os.stat(self.path)
        if self._stale or (st.st_dev, st.st_ino) != self._ident or st.st_size != self._offset:
            with self._locked():
                pass
        return bool(self.state.ready), self.state.next_due()

    # -- locking and catching up ----------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """flock, catch up, run the body, unlock."""
        if self._lock_fd < 0:
            raise BackendError(f"filestore {self.directory} is closed")
        self._lock()
        try:
            try:
                self._catch_up()
            except BaseException:
                self._stale = True
                raise
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _lock(self) -> None:
        deadline = time.monotonic() + self.lock_timeout
        pause = 0.0002
        while True:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise BackendUnavailable(
                        f"filestore {self.directory}: still locked by another process after {self.lock_timeout} s"
                    ) from None
            time.sleep(pause)
            pause = min(pause * 2, 0.005)

    def _catch_up(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._create()
            st = os.stat(self.path)
        if self._stale or (st.st_dev, st.st_ino) != self._ident or st.st_size < self._offset:
            self._reload()
        elif st.st_size > self._offset:
            self._replay(os.pread(self._fd, st.st_size - self._offset, self._offset), self._offset)

    def _create(self) -> None:
        """A new journal holding an empty snapshot, made atomically (we hold the lock)."""
        self._write_snapshot(State())
        log.info("filestore: created %s for namespace %r", self.path, self.namespace)

    def _reload(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        st = os.fstat(self._fd)
        data = os.pread(self._fd, st.st_size, 0)
        if data[: len(MAGIC)] != MAGIC:
            raise BackendError(f"filestore {self.path}: not a filestore journal of a format this version knows")
        self._ident = (st.st_dev, st.st_ino)
        self.state = State()
        self._offset = self._base = 0
        self._replay(data[len(MAGIC) :], len(MAGIC))
        if self._base == 0:
            raise BackendError(f"filestore {self.path}: the journal does not start with a snapshot")
        self._stale = False

    def _replay(self, data: bytes, start: int) -> None:
        pos = 0
        while pos < len(data):
            if len(data) - pos < _FRAME.size:
                break
            length, crc = _FRAME.unpack_from(data, pos)
            body = data[pos + _FRAME.size : pos + _FRAME.size + length]
            if length == 0 or len(body) < length or zlib.crc32(body) != crc:
                break
            self._apply(unpack(body), start + pos + _FRAME.size + length)
            pos += _FRAME.size + length
        self._offset = start + pos
        if pos < len(data):  # a torn tail: never acknowledged, cut it off (we hold the lock)
            log.warning("filestore %s: dropping %d bytes of an unfinished write", self.path, len(data) - pos)
            os.ftruncate(self._fd, self._offset)
            os.fsync(self._fd)

    def _apply(self, record: Record, end: int) -> None:
        if record[0] != "snapshot":
            self.state.apply(record)
            return
        _, namespace, dump = record
        if namespace != self.namespace:
            raise BackendError(
                f"filestore {self.directory} holds the data of loop {namespace!r}, not {self.namespace!r} "
                "(two NAMEs map to one directory on this file system); set another root"
            )
        self.state = State.load(dump)
        self._base = end

    # -- writing ----------------------------------------------------------------------------

    def _append(self, record: Record) -> None:
        body = pack(record)
        frame = _FRAME.pack(len(body), zlib.crc32(body)) + body
        view = memoryview(frame)
        while view:
            view = view[os.write(self._fd, view) :]
        os.fsync(self._fd)
        self._offset += len(frame)

    def _write_snapshot(self, state: State) -> None:
        body = pack(["snapshot", self.namespace, state.dump()])
        tmp = self.directory / "journal.tmp"
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600), "wb") as f:
            f.write(MAGIC + _FRAME.pack(len(body), zlib.crc32(body)) + body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.directory)

    def _compact(self) -> None:
        before = self._offset
        self._write_snapshot(self.state)
        self._stale = True
        self._reload()
        log.info("filestore %s: compacted the journal from %d to %d bytes", self.path, before, self._offset)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- one Journal per directory in this process ---------------------------------------------

_JOURNALS: dict[Path, Journal] = {}
_GUARD = threading.Lock()


def acquire(directory: Path, namespace: str, **options: Any) -> Journal:
    """The process's journal of ``directory`` (created on first use); pair with :func:`release`."""
    with _GUARD:
        journal = _JOURNALS.get(directory)
        if journal is None:
            journal = _JOURNALS[directory] = Journal(directory, namespace, **options)
        journal.refs += 1
        return journal


def release(journal: Journal) -> None:
    """Drop one reference; the last one closes the files after every queued operation ran."""
    with _GUARD:
        journal.refs -= 1
        if journal.refs > 0:
            return
        if _JOURNALS.get(journal.directory) is journal:
            del _JOURNALS[journal.directory]
    journal.executor.submit(journal.close)
    journal.executor.shutdown(wait=False)
