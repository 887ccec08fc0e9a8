"""``FileQueue`` and ``FileDoneSet``: the async side of the filestore backend.

Both are thin: every call runs one :class:`~achihuo_filestore.journal.Journal`
operation in the journal's single worker thread, so file I/O and lock waits
never block the event loop. A queue and a done set of one namespace in one
process share one journal (and one copy of the state in memory).
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from achihuo_mini.backend import Commit, DeadLetter, DoneSetBackend, Lease, NewTask, QueueStats, WorkerInfo
from achihuo_mini.backend_kit import default_data_dir, safe_filename
from achihuo_mini.errors import BackendError, BackendUnavailable, ConfigError

from . import journal as journal_module
from .journal import Journal
from .state import Record, State

__all__ = ["FileDoneSet", "FileQueue"]

_T = TypeVar("_T")


class _FileBackend:
    scope: Literal["host"] = "host"

    def __init__(
        self,
        namespace: str,
        root: str | os.PathLike[str] | None = None,
        lock_timeout: float = 30.0,
        compact_bytes: int = 8 << 20,
        poll_interval: float = 0.05,
    ) -> None:
        base = default_data_dir() / "filestore" if root is None else Path(os.path.expanduser(os.fspath(root)))
        self.lock_timeout, self.compact_bytes, self.poll_interval = lock_timeout, compact_bytes, poll_interval
        if not self.lock_timeout >= 0:
            raise ConfigError(f"filestore backend: lock_timeout must be >= 0 seconds, got {lock_timeout!r}")
        if not self.poll_interval > 0:
            raise ConfigError(f"filestore backend: poll_interval must be > 0 seconds, got {poll_interval!r}")
        self.namespace = namespace
        self.directory = Path(os.path.abspath(base / safe_filename(namespace)))  # no I/O before open()
        self.location = str(self.directory)
        self._journal: Journal | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r}, namespace={self.namespace!r})"

    async def open(self) -> None:
        """Create the directory and journal when missing, and replay the journal."""
        if self._journal is not None:
            return
        self._journal = journal_module.acquire(
            self.directory, self.namespace, lock_timeout=self.lock_timeout, compact_bytes=self.compact_bytes
        )
        try:
            await self._run(self._journal.open)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Release this instance's share of the journal. Idempotent; data stays."""
        journal, self._journal = self._journal, None
        if journal is not None:
            journal_module.release(journal)

    def _opened(self) -> Journal:
        if self._journal is None:
            raise BackendError(f"{self!r} is not open (await open() first)")
        return self._journal

    async def _run(self, fn: Callable[[], _T]) -> _T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._opened().executor, fn)
        except BackendError:  # BackendUnavailable is an OSError too
            raise
        except OSError as exc:
            raise BackendUnavailable(f"filestore {self.location}: {exc}") from exc

    async def _write(self, decide: Callable[[State, float], tuple[_T, Record | None]]) -> _T:
        """``decide(state, now)`` as one locked, journaled operation."""
        return await self._run(functools.partial(self._opened().write, decide))

    async def _read(self, query: Callable[[State], _T]) -> _T:
        """``query(state)`` on a caught-up state, under the lock."""
        return await self._run(functools.partial(self._opened().read, query))


class FileQueue(_FileBackend):
    """:class:`~achihuo_mini.backend.QueueBackend` with the WorkerRegistry and Notifier abilities.

    ``FileQueue(namespace, root=None, lock_timeout=30.0, compact_bytes=8 MiB, poll_interval=0.05)``.
    """

    def shares_done_set(self, done: DoneSetBackend) -> bool:
        """True for a :class:`FileDoneSet` of the same directory (one journal holds both)."""
        return isinstance(done, FileDoneSet) and done.directory == self.directory

    async def push(self, tasks: Sequence[NewTask]) -> int:
        return await self._write(lambda s, now: s.push(tasks, now)) if tasks else 0

    async def reserve(self, worker: str, limit: int) -> list[Lease]:
        return await self._write(lambda s, now: s.reserve(worker, limit, now)) if limit > 0 else []

    async def commit(self, commits: Sequence[Commit]) -> int:
        return await self._write(lambda s, now: s.commit(commits, now)) if commits else 0

    async def release(self, leases: Sequence[Lease], delay: float = 0.0) -> int:
        if not leases:
            return 0
        if delay > 0:  # held back: to the tail after the delay, no failure counted
            return await self._write(lambda s, now: s.hold(leases, now + delay))
        return await self._write(lambda s, now: s.release(leases))

    async def retry(self, items: Sequence[tuple[Lease, float]]) -> int:
        return await self._write(lambda s, now: s.retry(items, now)) if items else 0

    async def bury(self, items: Sequence[tuple[Lease, str]]) -> int:
        return await self._write(lambda s, now: s.bury(items)) if items else 0

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        return await self._read(lambda s: s.dead_letters(limit))

    async def requeue_dead(self, limit: int | None = None) -> int:
        return await self._write(lambda s, now: s.requeue(limit))

    async def stats(self) -> QueueStats:
        return await self._read(lambda s: s.stats())

    async def clear(self, what: Literal["queue", "dead"] = "queue") -> None:
        if what not in ("queue", "dead"):
            raise ValueError(f"clear() takes 'queue' or 'dead', not {what!r}")
        await self._write(lambda s, now: s.clear(what))

    # -- WorkerRegistry: the host clock (time.time()) is the backend's clock ---------------

    async def register(self, worker: str, role: str, info: Mapping[str, Any], ttl: float) -> str:
        return await self._write(lambda s, now: s.register(worker, role, info, ttl, now))

    async def heartbeat(self, worker: str, info: Mapping[str, Any], ttl: float) -> list[str] | None:
        return await self._write(lambda s, now: s.heartbeat(worker, info, ttl, now))

    async def unregister(self, worker: str) -> None:
        await self._write(lambda s, now: s.unregister(worker))

    async def workers(self) -> list[WorkerInfo]:
        now = time.time()
        return await self._read(lambda s: s.worker_list(now))

    async def send(self, aliases: Sequence[str], command: str) -> list[str]:
        return await self._write(lambda s, now: s.send(aliases, command))

    async def leases(self, worker: str) -> list[Lease]:
        return await self._read(lambda s: s.leases_of(worker))

    async def recover(self) -> int:
        return await self._write(lambda s, now: s.recover(now))

    # -- Notifier ----------------------------------------------------------------------------

    async def wait_for_tasks(self, timeout: float) -> None:
        """Return when tasks are ready or a delayed task is due, or after ``timeout`` seconds.

        Polls every ``poll_interval`` seconds; a poll is one ``stat`` of the journal
        unless another process or instance changed it.
        """
        journal = self._opened()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.0)
        while True:
            ready, due = await self._run(journal.probe)
            pause = min(self.poll_interval, deadline - loop.time())
            if due is not None:
                pause = min(pause, due - time.time())
            if ready or pause <= 0:
                return
            await asyncio.sleep(pause)


class FileDoneSet(_FileBackend):
    """:class:`~achihuo_mini.backend.DoneSetBackend` kept in the namespace's journal.

    ``FileDoneSet(namespace, root=None, lock_timeout=30.0, compact_bytes=8 MiB, poll_interval=0.05)``.
    """

    async def add(self, keys: Sequence[bytes]) -> int:
        return await self._write(lambda s, now: s.add(keys)) if keys else 0

    async def contains(self, keys: Sequence[bytes]) -> list[bool]:
        return await self._read(lambda s: [k in s.done for k in keys]) if keys else []

    async def remove(self, keys: Sequence[bytes]) -> int:
        return await self._write(lambda s, now: s.remove(keys)) if keys else 0

    async def count(self) -> int:
        return await self._read(lambda s: len(s.done))

    async def clear(self) -> None:
        await self._write(lambda s, now: s.clear("done"))
