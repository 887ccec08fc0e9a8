"""The ``memory`` backend: queue and done set in this process's memory.

Scope ``process``: loops with the same ``NAME`` in one process share the data
(that is how a test or an embedding script adds tasks to a running loop); nothing
survives the process. Every operation runs without awaiting, so it is atomic with
respect to the event loop. Registered through the ``achihuo_mini`` entry-point
group like any third-party plugin.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from achihuo_mini.backend import (
    Commit,
    DeadLetter,
    DoneSetBackend,
    Lease,
    NewTask,
    QueueStats,
    WorkerInfo,
)
from achihuo_mini.plugins import BackendSpec, hookimpl

__all__ = ["MemoryDoneSet", "MemoryQueue", "achihuo_register_backends", "drop_namespace"]


class _Task:
    __slots__ = ("attempt", "failures", "key", "payload", "worker")

    def __init__(self, payload: bytes, key: bytes | None) -> None:
        self.payload = payload
        self.key = key
        self.attempt = 0
        self.failures = 0
        self.worker: str | None = None


class _Worker:
    __slots__ = ("alias", "info", "last_seen", "mailbox", "role", "ttl")

    def __init__(self, alias: str, role: str, info: Mapping[str, Any], ttl: float, now: float) -> None:
        self.alias = alias
        self.role = role
        self.info = dict(info)
        self.ttl = ttl
        self.last_seen = now
        self.mailbox: list[str] = []


class _Store:
    """All data of one namespace."""

    def __init__(self) -> None:
        self.ids = itertools.count(1)
        self.tasks: dict[int, _Task] = {}
        self.ready: deque[int] = deque()
        self.delayed: list[tuple[float, int]] = []  # heap of (due, task id); id order breaks ties
        self.leased: dict[int, _Task] = {}
        self.pending: Counter[bytes] = Counter()
        self.dead: dict[int, tuple[_Task, str]] = {}
        self.done: set[bytes] = set()
        self.workers: dict[str, _Worker] = {}
        self.waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def wake(self) -> None:
        waiters, self.waiters = self.waiters, []
        for loop, fut in waiters:
            if not loop.is_closed():
                loop.call_soon_threadsafe(_resolve, fut)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


_STORES: dict[str, _Store] = {}


def _store(namespace: str) -> _Store:
    store = _STORES.get(namespace)
    if store is None:
        store = _STORES[namespace] = _Store()
    return store


def drop_namespace(namespace: str) -> None:
    """Forget all data of ``namespace`` in this process (tests use it to clean up)."""
    _STORES.pop(namespace, None)


class MemoryQueue:
    """In-process :class:`~achihuo_mini.backend.QueueBackend` with registry and notifier."""

    scope: Literal["process"] = "process"

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.location = f"memory:{namespace}"
        self._s = _store(namespace)

    def __repr__(self) -> str:
        return f"MemoryQueue({self.namespace!r})"

    async def open(self) -> None:
        self._s = _store(self.namespace)  # a cleared namespace comes back empty

    async def close(self) -> None:
        pass

    def shares_done_set(self, done: DoneSetBackend) -> bool:
        return isinstance(done, MemoryDoneSet) and done.namespace == self.namespace

    # -- queue -------------------------------------------------------------

    def _insert(self, tasks: Sequence[NewTask], check_done: bool) -> int:
        s = self._s
        now = time.monotonic()
        head: list[int] = []
        pushed = 0
        for t in tasks:
            key = t.key
            if key is not None:
                if t.unique and (s.pending[key] > 0 or (check_done and key in s.done)):
                    continue
                s.pending[key] += 1
            tid = next(s.ids)
            s.tasks[tid] = _Task(t.payload, key)
            pushed += 1
            if t.delay > 0:
                heapq.heappush(s.delayed, (now + t.delay, tid))
            elif t.head:
                head.append(tid)
            else:
                s.ready.append(tid)
        if head:
            s.ready.extendleft(reversed(head))
        if pushed:
            s.wake()
        return pushed

    async def push(self, tasks: Sequence[NewTask]) -> int:
        return self._insert(tasks, check_done=True)

    def _promote_due(self) -> None:
        s = self._s
        now = time.monotonic()
        while s.delayed and s.delayed[0][0] <= now:
            _, tid = heapq.heappop(s.delayed)
            if tid in s.tasks:
                s.ready.append(tid)

    async def reserve(self, worker: str, limit: int) -> list[Lease]:
        s = self._s
        if limit <= 0:
            return []
        if s.delayed:
            self._promote_due()
        out: list[Lease] = []
        while len(out) < limit and s.ready:
            tid = s.ready.popleft()
            task = s.tasks.get(tid)
            if task is None:
                continue
            task.attempt += 1
            task.worker = worker
            s.leased[tid] = task
            out.append(Lease(tid, task.payload, task.key, worker, task.attempt, task.failures))
        return out

    def _held(self, lease: Lease) -> _Task | None:
        task = self._s.leased.get(lease.task_id)
        if task is None or task.worker != lease.worker or task.attempt != lease.attempt:
            return None
        return task

    def _forget(self, tid: int, task: _Task) -> None:
        s = self._s
        del s.tasks[tid]
        if task.key is not None:
            n = s.pending[task.key] - 1
            if n > 0:
                s.pending[task.key] = n
            else:
                del s.pending[task.key]

    async def commit(self, commits: Sequence[Commit]) -> int:
        s = self._s
        applied = 0
        for c in commits:
            task = self._held(c.lease)
            if task is None:
                continue
            del s.leased[c.lease.task_id]
            self._forget(c.lease.task_id, task)
            s.done.difference_update(c.undone)
            s.done.update(c.done)
            if c.children:
                self._insert(c.children, check_done=True)
            applied += 1
        return applied

    def _unlease(self, leases: Sequence[Lease]) -> list[int]:
        held = []
        for lease in leases:
            task = self._held(lease)
            if task is not None:
                del self._s.leased[lease.task_id]
                task.worker = None
                held.append(lease.task_id)
        return held

    async def release(self, leases: Sequence[Lease]) -> int:
        held = self._unlease(leases)
        self._s.ready.extendleft(reversed(held))
        if held:
            self._s.wake()
        return len(held)

    async def retry(self, items: Sequence[tuple[Lease, float]]) -> int:
        s = self._s
        now = time.monotonic()
        n = 0
        for lease, delay in items:
            if not self._unlease([lease]):
                continue
            s.tasks[lease.task_id].failures += 1
            heapq.heappush(s.delayed, (now + max(delay, 0.0), lease.task_id))
            n += 1
        return n

    async def bury(self, items: Sequence[tuple[Lease, str]]) -> int:
        s = self._s
        n = 0
        for lease, error in items:
            if not self._unlease([lease]):
                continue
            task = s.tasks[lease.task_id]
            task.failures += 1
            self._forget(lease.task_id, task)
            s.dead[lease.task_id] = (task, error[:2048])
            n += 1
        return n

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        return [
            DeadLetter(tid, task.payload, task.key, error, task.failures)
            for tid, (task, error) in itertools.islice(self._s.dead.items(), max(limit, 0))
        ]

    async def requeue_dead(self, limit: int | None = None) -> int:
        s = self._s
        chosen = list(itertools.islice(s.dead, limit))
        tasks = []
        for tid in chosen:
            task, _ = s.dead.pop(tid)
            tasks.append(NewTask(task.payload, task.key))
        return self._insert(tasks, check_done=False)

    async def stats(self) -> QueueStats:
        s = self._s
        delayed = sum(1 for _, tid in s.delayed if tid in s.tasks and tid not in s.leased)
        return QueueStats(
            ready=len(s.tasks) - len(s.leased) - delayed, delayed=delayed, leased=len(s.leased), dead=len(s.dead)
        )

    async def clear(self, what: Literal["queue", "dead"] = "queue") -> None:
        s = self._s
        if what == "dead":
            s.dead.clear()
            return
        s.tasks.clear()
        s.ready.clear()
        s.delayed.clear()
        s.leased.clear()
        s.pending.clear()

    # -- registry ----------------------------------------------------------

    async def register(self, worker: str, role: str, info: Mapping[str, Any], ttl: float) -> str:
        s = self._s
        prefix = "m" if role == "master" else "s"
        taken = {w.alias for w in s.workers.values()}
        alias = next(f"{prefix}{i}" for i in itertools.count(1) if f"{prefix}{i}" not in taken)
        s.workers[worker] = _Worker(alias, role, info, ttl, time.monotonic())
        return alias

    async def heartbeat(self, worker: str, info: Mapping[str, Any], ttl: float) -> list[str] | None:
        w = self._s.workers.get(worker)
        if w is None:
            return None
        w.last_seen = time.monotonic()
        w.ttl = ttl
        w.info = dict(info)
        commands, w.mailbox = w.mailbox, []
        return commands

    async def unregister(self, worker: str) -> None:
        self._s.workers.pop(worker, None)
        await self._release_worker({worker})

    def _leases_of(self, workers: set[str]) -> list[Lease]:
        found = [
            Lease(tid, t.payload, t.key, t.worker, t.attempt, t.failures)
            for tid, t in self._s.leased.items()
            if t.worker in workers
        ]
        return sorted(found, key=lambda lease: lease.task_id)

    async def _release_worker(self, workers: set[str]) -> int:
        return await self.release(self._leases_of(workers))

    async def leases(self, worker: str) -> list[Lease]:
        return self._leases_of({worker})

    async def workers(self) -> list[WorkerInfo]:
        now = time.monotonic()
        found = [
            WorkerInfo(wid, w.alias, w.role, dict(w.info), now - w.last_seen) for wid, w in self._s.workers.items()
        ]
        return sorted(found, key=lambda w: (w.alias[0], int(w.alias[1:])))

    async def send(self, aliases: Sequence[str], command: str) -> list[str]:
        found = []
        for w in self._s.workers.values():
            if w.alias in aliases:
                w.mailbox.append(command)
                found.append(w.alias)
        return [a for a in aliases if a in found]

    async def recover(self) -> int:
        s = self._s
        now = time.monotonic()
        for wid in [wid for wid, w in s.workers.items() if now - w.last_seen > w.ttl]:
            del s.workers[wid]
        orphans = {t.worker for t in s.leased.values() if t.worker not in s.workers}
        return await self._release_worker(orphans) if orphans else 0  # type: ignore[arg-type]

    # -- notifier ----------------------------------------------------------

    async def wait_for_tasks(self, timeout: float) -> None:
        s = self._s
        if s.ready:
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        entry = (loop, fut)
        s.waiters.append(entry)
        if s.delayed:
            timeout = min(timeout, max(s.delayed[0][0] - time.monotonic(), 0.0))
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            pass
        finally:
            if entry in s.waiters:
                s.waiters.remove(entry)


class MemoryDoneSet:
    """In-process :class:`~achihuo_mini.backend.DoneSetBackend`."""

    scope: Literal["process"] = "process"

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.location = f"memory:{namespace}"

    def __repr__(self) -> str:
        return f"MemoryDoneSet({self.namespace!r})"

    @property
    def _done(self) -> set[bytes]:
        return _store(self.namespace).done

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def add(self, keys: Sequence[bytes]) -> int:
        done = self._done
        before = len(done)
        done.update(keys)
        return len(done) - before

    async def contains(self, keys: Sequence[bytes]) -> list[bool]:
        done = self._done
        return [k in done for k in keys]

    async def remove(self, keys: Sequence[bytes]) -> int:
        done = self._done
        before = len(done)
        done.difference_update(keys)
        return before - len(done)

    async def count(self) -> int:
        return len(self._done)

    async def clear(self) -> None:
        self._done.clear()


@hookimpl
def achihuo_register_backends(register: Any) -> None:
    register(
        BackendSpec(
            name="memory",
            scope="process",
            description="in this process's memory; fast, lost when the process ends",
            create_queue=lambda namespace, options: MemoryQueue(namespace),
            create_done_set=lambda namespace, options: MemoryDoneSet(namespace),
        )
    )
