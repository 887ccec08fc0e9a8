"""The ``memory`` backend: queue and done set in this process's memory.

Scope ``process``: loops with the same ``NAME`` in one process share the data
(that is how a test or an embedding script adds tasks to a running loop); nothing
survives the process. Every operation runs without awaiting, so it is atomic with
respect to the event loop. Registered through the ``achihuo_mini`` entry-point
group like any third-party plugin.

Abilities: worker registry, notifier, per-host slots (:class:`~achihuo_mini.backend.HostSlots`,
within this process) and expiring done names (:class:`~achihuo_mini.backend.ExpiringDoneSet`;
the clock is ``time.monotonic()``; ``add_expiring`` also drops a few names whose ttl passed,
oldest first).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from achihuo_mini.backend import (
    COUNTS_LIMIT,
    Commit,
    DeadLetter,
    DoneSetBackend,
    HostAsk,
    HostGrant,
    Lease,
    NewTask,
    QueueStats,
    WorkerInfo,
)
from achihuo_mini.backend_kit import merge_counts
from achihuo_mini.plugins import BackendSpec, hookimpl

__all__ = ["MemoryDoneSet", "MemoryQueue", "achihuo_register_backends", "drop_namespace"]


class _Task:
    """A task that has a task id: leased, delayed, dead, or back in the ready deque after a lease."""

    __slots__ = ("attempt", "failures", "key", "payload", "tid", "worker")

    def __init__(
        self, tid: int, payload: bytes, key: bytes | None, worker: str | None = None, attempt: int = 0
    ) -> None:
        self.tid = tid
        self.payload = payload
        self.key = key
        self.attempt = attempt
        self.failures = 0
        self.worker = worker


_NAMED = None
"""In the ready deque: the next two entries are the key and the payload of a fresh named task."""

_Entry = bytes | int | _Task | None


class _Worker:
    __slots__ = ("alias", "info", "last_seen", "mailbox", "role", "ttl")

    def __init__(self, alias: str, role: str, info: Mapping[str, Any], ttl: float, now: float) -> None:
        self.alias = alias
        self.role = role
        self.info = dict(info)
        self.ttl = ttl
        self.last_seen = now
        self.mailbox: list[str] = []


class _HostState:
    """Per-host slots and turns: the next free start, and worker -> [slots, expires, waiting until]."""

    __slots__ = ("holders", "next_start")

    def __init__(self) -> None:
        self.next_start = 0.0
        self.holders: dict[str, list[float]] = {}


class _Store:
    """All data of one namespace.

    Every queued task is in exactly one of ``ready``, ``delayed`` and ``leased``.

    A task costs about its payload while it waits in ``ready`` for its first lease: an
    unnamed one is just its payload ``bytes``, a named one the three entries ``_NAMED,
    key, payload`` (the key object is mostly the one ``pending`` holds anyway). Its :class:`_Task`
    record (attempt, failures, worker) is made when it is first reserved; a record that
    comes back (release, recovery, an expired retry) goes into ``ready`` as itself.
    Delayed pushes get their record at once.

    Task ids are still given in push order, as if every task had one from the start:
    fresh tasks in ``ready`` take consecutive ids from ``head_id`` on, except that an
    ``int`` entry sets the id of the fresh task after it. Pushes to the tail that
    continue ``tail_id`` (the id the next fresh task at the tail would get) need no such
    entry; one is needed only where a head or delayed push used ids in between.
    Records do not take part in the count.

    The queue methods hold ``lock`` (an event loop in another thread may push while
    this one reserves); the ``_`` helpers expect it held.
    """

    def __init__(self) -> None:
        self.next_id = 1  # the id of the next pushed task; never reused
        self.ready: deque[_Entry] = deque()
        self.head_id = self.tail_id = 1
        self.extra = 0  # entries in ready that are not one per task: id entries, and two per fresh named task
        self.delayed: list[tuple[float, int, _Task]] = []  # heap of (due, task id, task); id order breaks ties
        self.leased: dict[int, _Task] = {}
        self.pending: dict[bytes, int] = {}
        self.dead: dict[int, tuple[_Task, str]] = {}
        self.done: set[bytes] = set()
        self.expires: dict[bytes, float] = {}  # done keys with a ttl -> monotonic deadline, oldest write first
        self.hosts: dict[str, _HostState] = {}
        self.workers: dict[str, _Worker] = {}
        self.counts: dict[str, int] = {}
        self.waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self.lock = threading.Lock()  # loops in other threads may share the namespace

    def is_done(self, key: bytes) -> bool:
        """``key`` is done and its ttl (if any) has not passed."""
        if key not in self.done:
            return False
        if not self.expires:
            return True
        deadline = self.expires.get(key)
        return deadline is None or deadline > time.monotonic()

    def put_done(self, keys: Sequence[bytes]) -> int:
        """Make keys done for ever; return how many were not done before."""
        done, expires = self.done, self.expires
        new = 0
        for key in keys:
            if not self.is_done(key):
                new += 1
            done.add(key)
            if expires:
                expires.pop(key, None)
        return new

    def put_expiring(self, items: Sequence[tuple[bytes, float]]) -> int:
        """Make keys done for a ttl each; return how many were not done before; drop a few expired ones."""
        done, expires = self.done, self.expires
        now = time.monotonic()
        new = 0
        for key, ttl in items:
            if not self.is_done(key):
                new += 1
            done.add(key)
            expires.pop(key, None)  # to the end: the dict stays in write order
            expires[key] = now + ttl
        for key in list(itertools.islice(expires, 2 * len(items) + 1)):
            if expires[key] > now:
                break
            del expires[key]
            done.discard(key)
        return new

    def drop_done(self, keys: Sequence[bytes]) -> int:
        """Remove keys; return how many were done (ttl not passed)."""
        present = 0
        for key in keys:
            if self.is_done(key):
                present += 1
            self.done.discard(key)
            if self.expires:
                self.expires.pop(key, None)
        return present

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
        self.children_pushed = 0  # children this object's commits enqueued (the loop reports them)
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
        ready, pending = s.ready, s.pending
        now = time.monotonic()
        tid, tail_id, extra = s.next_id, s.tail_id, s.extra
        head: list[_Entry] = []
        head_first = head_next = 0  # the ids of the first head task and of the one after the last
        for t in tasks:
            key = t.key
            if key is not None:
                count = pending.get(key, 0)
                if t.unique and (count or (check_done and s.is_done(key))):
                    continue
                pending[key] = count + 1
            if t.delay > 0:
                heapq.heappush(s.delayed, (now + t.delay, tid, _Task(tid, t.payload, key)))
            elif t.head:
                if not head:
                    head_first = tid
                elif tid != head_next:
                    head.append(tid)
                    extra += 1
                head_next = tid + 1
                if key is None:
                    head.append(t.payload)
                else:
                    head += (_NAMED, key, t.payload)
                    extra += 2
            else:
                if tid != tail_id:
                    ready.append(tid)
                    extra += 1
                tail_id = tid + 1
                if key is None:
                    ready.append(t.payload)
                else:
                    ready.extend((_NAMED, key, t.payload))
                    extra += 2
            tid += 1
        if head:
            if not ready:
                tail_id = head_next
            elif head_next != s.head_id:  # what was there keeps its ids
                head.append(s.head_id)
                extra += 1
            s.head_id = head_first
            ready.extendleft(reversed(head))
        pushed = tid - s.next_id
        s.next_id, s.tail_id, s.extra = tid, tail_id, extra
        if pushed:
            s.wake()
        return pushed

    async def push(self, tasks: Sequence[NewTask]) -> int:
        with self._s.lock:
            return self._insert(tasks, check_done=True)

    def _promote_due(self) -> None:
        s = self._s
        now = time.monotonic()
        while s.delayed and s.delayed[0][0] <= now:
            s.ready.append(heapq.heappop(s.delayed)[2])

    async def reserve(self, worker: str, limit: int) -> list[Lease]:
        s = self._s
        with s.lock:
            if limit <= 0:
                return []
            if s.delayed:
                self._promote_due()
            ready: deque[Any] = s.ready  # Any: the entry types are told apart below, without casts
            leased = s.leased
            head_id, extra = s.head_id, s.extra
            out: list[Lease] = []
            for _ in range(min(limit, len(ready) - extra)):
                entry = ready.popleft()
                while type(entry) is int:  # the id of the next fresh task; always followed by a task
                    head_id = entry
                    extra -= 1
                    entry = ready.popleft()
                if type(entry) is _Task:  # leased before
                    entry.attempt += 1
                    entry.worker = worker
                    leased[entry.tid] = entry
                    out.append(Lease(entry.tid, entry.payload, entry.key, worker, entry.attempt, entry.failures))
                    continue
                key: bytes | None = None
                if entry is _NAMED:
                    key = ready.popleft()
                    entry = ready.popleft()
                    extra -= 2
                leased[head_id] = _Task(head_id, entry, key, worker, 1)
                out.append(Lease(head_id, entry, key, worker, 1, 0))
                head_id += 1
            s.head_id, s.extra = head_id, extra
            return out

    def _unlease(self, lease: Lease) -> _Task | None:
        """Take a still-held lease's task out of ``leased``; ``None`` when the lease is fenced."""
        leased = self._s.leased
        task = leased.get(lease.task_id)
        if task is None or task.worker != lease.worker or task.attempt != lease.attempt:
            return None
        del leased[lease.task_id]
        task.worker = None
        return task

    def _forget(self, task: _Task) -> None:
        """Drop the pending count of a task that leaves the queue."""
        key = task.key
        if key is not None:
            pending = self._s.pending
            n = pending[key] - 1
            if n > 0:
                pending[key] = n
            else:
                del pending[key]

    async def commit(self, commits: Sequence[Commit]) -> int:
        s = self._s
        with s.lock:
            applied = 0
            for c in commits:
                task = self._unlease(c.lease)
                if task is None:
                    continue
                self._forget(task)
                if c.undone:
                    s.drop_done(c.undone)
                if c.done:
                    s.put_done(c.done)
                if c.expiring:
                    s.put_expiring(c.expiring)
                if c.children:
                    self.children_pushed += self._insert(c.children, check_done=True)
                applied += 1
            return applied

    def _release(self, leases: Sequence[Lease]) -> int:
        held = [task for task in map(self._unlease, leases) if task is not None]
        if held:
            self._s.ready.extendleft(reversed(held))
            self._s.wake()
        return len(held)

    async def release(self, leases: Sequence[Lease], delay: float = 0.0) -> int:
        with self._s.lock:
            if not delay > 0:  # also NaN
                return self._release(leases)
            s = self._s
            due = time.monotonic() + delay
            n = 0
            for task in map(self._unlease, leases):
                if task is not None:
                    heapq.heappush(s.delayed, (due, task.tid, task))
                    n += 1
            return n

    async def retry(self, items: Sequence[tuple[Lease, float]]) -> int:
        s = self._s
        with s.lock:
            now = time.monotonic()
            n = 0
            for lease, delay in items:
                task = self._unlease(lease)
                if task is None:
                    continue
                task.failures += 1
                due = now + delay if delay > 0 else now  # a negative or NaN delay counts as 0, as elsewhere
                heapq.heappush(s.delayed, (due, task.tid, task))
                n += 1
            return n

    async def bury(self, items: Sequence[tuple[Lease, str]]) -> int:
        s = self._s
        with s.lock:
            n = 0
            for lease, error in items:
                task = self._unlease(lease)
                if task is None:
                    continue
                task.failures += 1
                self._forget(task)
                s.dead[task.tid] = (task, error[:2048])
                n += 1
            return n

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        with self._s.lock:
            return [
                DeadLetter(tid, task.payload, task.key, error, task.failures)
                for tid, (task, error) in itertools.islice(self._s.dead.items(), max(limit, 0))
            ]

    async def requeue_dead(self, limit: int | None = None) -> int:
        s = self._s
        if limit is not None and limit <= 0:  # islice() refuses a negative limit
            return 0
        with s.lock:
            chosen = list(itertools.islice(s.dead, limit))
            tasks = []
            for tid in chosen:
                task, _ = s.dead.pop(tid)
                tasks.append(NewTask(task.payload, task.key))
            return self._insert(tasks, check_done=False)

    async def stats(self) -> QueueStats:
        s = self._s
        with s.lock:
            return QueueStats(
                ready=len(s.ready) - s.extra, delayed=len(s.delayed), leased=len(s.leased), dead=len(s.dead)
            )

    async def clear(self, what: Literal["queue", "dead"] = "queue") -> None:
        s = self._s
        with s.lock:
            if what == "dead":
                s.dead.clear()
                return
            s.ready.clear()
            s.head_id = s.tail_id = s.next_id
            s.extra = 0
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
        with self._s.lock:
            self._release(self._leases_of({worker}))

    def _leases_of(self, workers: set[str]) -> list[Lease]:
        found = [
            Lease(tid, t.payload, t.key, t.worker, t.attempt, t.failures)
            for tid, t in self._s.leased.items()
            if t.worker in workers
        ]
        return sorted(found, key=lambda lease: lease.task_id)

    async def leases(self, worker: str) -> list[Lease]:
        with self._s.lock:
            return self._leases_of({worker})

    # -- CounterStore ------------------------------------------------------------------

    async def add_counts(self, counts: Mapping[str, int]) -> None:
        with self._s.lock:
            merge_counts(self._s.counts, counts)

    async def counts(self) -> dict[str, int]:
        with self._s.lock:
            return dict(itertools.islice(self._s.counts.items(), COUNTS_LIMIT))

    async def clear_counts(self) -> None:
        with self._s.lock:
            self._s.counts.clear()

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
        with s.lock:
            orphans = {t.worker for t in s.leased.values() if t.worker not in s.workers}
            return self._release(self._leases_of(orphans)) if orphans else 0  # type: ignore[arg-type]

    # -- per-host slots ----------------------------------------------------

    async def claim_hosts(self, worker: str, asks: Sequence[HostAsk], ttl: float, wait: float) -> list[HostGrant]:
        """Release, take slots and reserve turns per host, atomically (see ``HostSlots``)."""
        s = self._s
        with s.lock:
            now = time.monotonic()
            return [self._claim(s, worker, ask, now, ttl, wait) for ask in asks]

    @staticmethod
    def _claim(s: _Store, worker: str, ask: HostAsk, now: float, ttl: float, wait: float) -> HostGrant:
        state = s.hosts.get(ask.host)
        if state is None:
            state = s.hosts[ask.host] = _HostState()
        holders = state.holders
        for w, entry in list(holders.items()):
            if entry[1] <= now:
                entry[0] = 0
            if not entry[0] and entry[2] <= now:
                del holders[w]
        mine = holders.pop(worker, [0, 0.0, 0.0])
        held = int(mine[0]) - min(max(ask.release, 0), int(mine[0]))
        granted = 0
        waiting = mine[2]
        if ask.slots > 0:
            others = sum(int(e[0]) for e in holders.values())
            free = max(ask.limit - others - held, 0) if ask.limit > 0 else ask.slots
            granted = min(ask.slots, free)
            held += granted
            waiting = now + wait if granted < ask.slots else 0.0
        if held or waiting > now:
            holders[worker] = [held, now + ttl, waiting]
        start, turns = 0.0, max(ask.turns, 0)
        if turns and ask.delay > 0:
            first = max(now, state.next_start)
            state.next_start = first + turns * ask.delay
            start = first - now
        if not holders and state.next_start <= now:
            del s.hosts[ask.host]
        return HostGrant(granted, held, max(len(holders), 1), start, turns)

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
        return _store(self.namespace).put_done(keys)

    async def add_expiring(self, items: Sequence[tuple[bytes, float]]) -> int:
        return _store(self.namespace).put_expiring(items)

    async def contains(self, keys: Sequence[bytes]) -> list[bool]:
        s = _store(self.namespace)
        if not s.expires:
            done = s.done
            return [k in done for k in keys]
        return [s.is_done(k) for k in keys]

    async def remove(self, keys: Sequence[bytes]) -> int:
        return _store(self.namespace).drop_done(keys)

    async def count(self) -> int:
        return len(self._done)

    async def clear(self) -> None:
        s = _store(self.namespace)
        s.done.clear()
        s.expires.clear()


@hookimpl
def achihuo_register_backends(register: Any) -> None:
    register(
        BackendSpec(
            name="memory",
            scope="process",
            description="in this process's memory; fast, lost when the process ends",
            create_queue=lambda namespace, options: MemoryQueue(namespace),
            create_done_set=lambda namespace, options: MemoryDoneSet(namespace),
            list_loops=_list_loops,
            has_data=_has_data,
        )
    )


async def _list_loops(options: Mapping[str, Any]) -> list[str]:
    """The namespaces with data in this process."""
    return sorted(_STORES)


async def _has_data(namespace: str, options: Mapping[str, Any]) -> bool:
    """Whether this process holds anything of ``namespace`` (another process's never shows)."""
    s = _STORES.get(namespace)
    return s is not None and bool(
        s.leased or s.delayed or s.dead or s.done or s.workers or s.counts or len(s.ready) > s.extra
    )
