"""The state of one namespace, and the journal records that change it.

A writer *decides* an operation against the current state -- unique checks,
fencing, aliases, which delayed tasks are due -- and gets back its result and a
*record* of the decision. :meth:`State.apply` replays a record mechanically,
deciding nothing again, so every process that replays the journal in order
reaches the same state. Deciding and replaying share the same mutators. Records
are msgpack lists (``key`` is a 16-byte digest or None, times are unix seconds):

=====================================================  ==========================================
``["snapshot", namespace, dump]``                      first record of every journal file
``["push", entries]``                                  entry: ``[payload, key, kind, due]``
``["reserve", worker, now, n]``                        promote tasks due at ``now``, lease ``n``
``["commit", [[task_id, done, undone, entries]...]]``  only the commits that were applied
``["release", task_ids]``                              to the head, in order
``["retry", [[task_id, due]...]]`` / ``["bury", [[task_id, error]...]]``
``["hold", [[task_id, due]...]]``                      a release with a delay: no failure counted
``["requeue", n]`` / ``["clear", "queue"|"dead"|"done"]`` / ``["add", keys]`` / ``["remove", keys]``
``["register", worker, role, alias, info, now, ttl]`` / ``["heartbeat", worker, info, now, ttl]``
``["send", workers, command]`` / ``["drop", workers, task_ids]``  (unregister, recover)
=====================================================  ==========================================
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
from achihuo_mini.backend import Commit, DeadLetter, Lease, NewTask, QueueStats, WorkerInfo
from achihuo_mini.backend_kit import alias_order, lowest_free_alias

__all__ = ["ERROR_LIMIT", "Record", "State", "pack", "unpack"]

ERROR_LIMIT = 2048
"""Dead-letter error texts are cut to this many characters."""

TAIL, HEAD, DELAYED = 0, 1, 2
Record = list[Any]
Entry = list[Any]  # [payload, key, kind, due]


def pack(obj: Any) -> bytes:
    """msgpack with bytes kept apart from str; lone surrogates in str survive."""
    data: bytes = msgpack.packb(obj, use_bin_type=True, unicode_errors="surrogatepass")
    return data


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, unicode_errors="surrogatepass")


@dataclass(slots=True)
class _Task:
    payload: bytes
    key: bytes | None
    attempt: int = 0
    failures: int = 0
    worker: str | None = None


@dataclass(slots=True)
class _Worker:
    alias: str
    role: str
    info: Any
    ttl: float
    last_seen: float
    mailbox: list[str] = field(default_factory=list)


def _plain(info: Mapping[str, Any]) -> Any:
    """``info`` as the journal will give it back (checked before anything changes)."""
    try:
        return unpack(pack(dict(info)))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"worker info must be JSON-compatible data: {exc}") from exc


class State:
    """Tasks, dead letters, done keys and workers of one namespace, in memory."""

    def __init__(self) -> None:
        self.next_id = 1  # task ids are never reused, not even after a clear
        self.tasks: dict[int, _Task] = {}
        self.ready: deque[int] = deque()
        self.delayed: list[tuple[float, int]] = []  # heap of (due, task id)
        self.leased: set[int] = set()
        self.pending: Counter[bytes] = Counter()
        self.dead: dict[int, tuple[_Task, str]] = {}  # burial order
        self.done: set[bytes] = set()
        self.workers: dict[str, _Worker] = {}

    # -- snapshot --------------------------------------------------------------

    def dump(self) -> list[Any]:
        return [
            self.next_id,
            [[tid, t.payload, t.key, t.attempt, t.failures, t.worker] for tid, t in self.tasks.items()],
            list(self.ready),
            [list(item) for item in self.delayed],
            [[tid, t.payload, t.key, t.failures, error] for tid, (t, error) in self.dead.items()],
            list(self.done),
            [[wid, w.alias, w.role, w.info, w.ttl, w.last_seen, w.mailbox] for wid, w in self.workers.items()],
        ]

    @classmethod
    def load(cls, dump: list[Any]) -> State:
        s = cls()
        s.next_id, tasks, ready, delayed, dead, done, workers = dump
        for tid, payload, key, attempt, failures, worker in tasks:
            s.tasks[tid] = _Task(payload, key, attempt, failures, worker)
            if worker is not None:
                s.leased.add(tid)
            if key is not None:
                s.pending[key] += 1
        s.ready.extend(ready)
        s.delayed = [(due, tid) for due, tid in delayed]  # a heap already
        s.dead = {tid: (_Task(payload, key, 0, failures), error) for tid, payload, key, failures, error in dead}
        s.done = set(done)
        s.workers = {wid: _Worker(*rest) for wid, *rest in workers}
        return s

    # -- mutators shared by deciding and replaying ---------------------------------

    def _insert(self, entries: Sequence[Entry]) -> None:
        heads: list[int] = []
        for payload, key, kind, due in entries:
            tid, self.next_id = self.next_id, self.next_id + 1
            self.tasks[tid] = _Task(payload, key)
            if key is not None:
                self.pending[key] += 1
            if kind == DELAYED:
                heapq.heappush(self.delayed, (due, tid))
            elif kind == HEAD:
                heads.append(tid)
            else:
                self.ready.append(tid)
        self.ready.extendleft(reversed(heads))

    def _reserve(self, worker: str, now: float, n: int) -> tuple[list[Lease], int]:
        promoted = 0
        while self.delayed and self.delayed[0][0] <= now:
            _, tid = heapq.heappop(self.delayed)
            if tid in self.tasks:
                self.ready.append(tid)
                promoted += 1
        leases = []
        for _ in range(min(n, len(self.ready))):
            tid = self.ready.popleft()
            task = self.tasks[tid]
            task.attempt += 1
            task.worker = worker
            self.leased.add(tid)
            leases.append(Lease(tid, task.payload, task.key, worker, task.attempt, task.failures))
        return leases, promoted

    def _unlease(self, tid: int) -> _Task:
        self.leased.discard(tid)
        task = self.tasks[tid]
        task.worker = None
        return task

    def _forget(self, tid: int) -> _Task:
        task = self.tasks.pop(tid)
        self.leased.discard(tid)
        if task.key is not None:
            self.pending[task.key] -= 1
            if self.pending[task.key] <= 0:
                del self.pending[task.key]
        return task

    def _ack(self, tid: int, done: Sequence[bytes], undone: Sequence[bytes]) -> None:
        self._forget(tid)
        self.done.difference_update(undone)
        self.done.update(done)

    def _to_head(self, tids: Sequence[int]) -> None:
        for tid in tids:
            self._unlease(tid)
        self.ready.extendleft(reversed(tids))

    def _retry(self, tid: int, due: float) -> None:
        self._unlease(tid).failures += 1
        heapq.heappush(self.delayed, (due, tid))

    def _hold(self, tid: int, due: float) -> None:
        self._unlease(tid)
        heapq.heappush(self.delayed, (due, tid))

    def _bury(self, tid: int, error: str) -> None:
        self._unlease(tid)
        task = self._forget(tid)
        task.failures += 1
        self.dead[tid] = (task, error)

    def _requeue(self, n: int) -> None:
        chosen = list(itertools.islice(self.dead, n))
        entries = [[self.dead[tid][0].payload, self.dead[tid][0].key, TAIL, 0.0] for tid in chosen]
        for tid in chosen:
            del self.dead[tid]
        self._insert(entries)

    def _clear(self, what: str) -> None:
        if what == "dead":
            self.dead.clear()
        elif what == "done":
            self.done.clear()
        else:
            self.tasks.clear()
            self.ready.clear()
            self.delayed.clear()
            self.leased.clear()
            self.pending.clear()

    def _drop(self, workers: Sequence[str], tids: Sequence[int]) -> None:
        for wid in workers:
            self.workers.pop(wid, None)
        self._to_head(tids)

    def apply(self, rec: Record) -> None:
        """Replay one record (the snapshot record is handled by the journal)."""
        match rec:
            case ["push", entries]:
                self._insert(entries)
            case ["reserve", worker, now, n]:
                self._reserve(worker, now, n)
            case ["commit", items]:
                for tid, done, undone, entries in items:
                    self._ack(tid, done, undone)
                    self._insert(entries)
            case ["release", tids]:
                self._to_head(tids)
            case ["retry", items]:
                for tid, due in items:
                    self._retry(tid, due)
            case ["hold", items]:
                for tid, due in items:
                    self._hold(tid, due)
            case ["bury", items]:
                for tid, error in items:
                    self._bury(tid, error)
            case ["requeue", n]:
                self._requeue(n)
            case ["clear", what]:
                self._clear(what)
            case ["add", keys]:
                self.done.update(keys)
            case ["remove", keys]:
                self.done.difference_update(keys)
            case ["register", worker, role, alias, info, now, ttl]:
                self.workers[worker] = _Worker(alias, role, info, ttl, now)
            case ["heartbeat", worker, info, now, ttl]:
                w = self.workers[worker]
                w.info, w.last_seen, w.ttl, w.mailbox = info, now, ttl, []
            case ["send", workers, command]:
                for wid in workers:
                    self.workers[wid].mailbox.append(command)
            case ["drop", workers, tids]:
                self._drop(workers, tids)
            case _:
                raise ValueError(f"unknown journal record {rec[:1]!r}")

    # -- decisions: (result, record or None when nothing changed) --------------------

    def _accept(self, tasks: Sequence[NewTask], now: float) -> list[Entry]:
        entries: list[Entry] = []
        seen: set[bytes] = set()
        for t in tasks:
            key = t.key
            if key is not None:
                if t.unique and (key in seen or self.pending[key] > 0 or key in self.done):
                    continue
                seen.add(key)
            if t.delay > 0:
                entries.append([t.payload, key, DELAYED, now + t.delay])
            else:
                entries.append([t.payload, key, HEAD if t.head else TAIL, 0.0])
        return entries

    def push(self, tasks: Sequence[NewTask], now: float) -> tuple[int, Record | None]:
        entries = self._accept(tasks, now)
        self._insert(entries)
        return len(entries), ["push", entries] if entries else None

    def reserve(self, worker: str, limit: int, now: float) -> tuple[list[Lease], Record | None]:
        leases, promoted = self._reserve(worker, now, limit)
        return leases, ["reserve", worker, now, len(leases)] if leases or promoted else None

    def held(self, lease: Lease) -> bool:
        task = self.tasks.get(lease.task_id)
        return (
            task is not None
            and lease.task_id in self.leased
            and task.worker == lease.worker
            and task.attempt == lease.attempt
        )

    def commit(self, commits: Sequence[Commit], now: float) -> tuple[int, Record | None]:
        items = []
        for c in commits:
            if self.held(c.lease):
                done, undone = list(c.done), list(c.undone)
                self._ack(c.lease.task_id, done, undone)
                entries = self._accept(c.children, now)  # after the ack and the done keys
                self._insert(entries)
                items.append([c.lease.task_id, done, undone, entries])
        return len(items), ["commit", items] if items else None

    def release(self, leases: Sequence[Lease]) -> tuple[int, Record | None]:
        tids = list(dict.fromkeys(lease.task_id for lease in leases if self.held(lease)))
        self._to_head(tids)
        return len(tids), ["release", tids] if tids else None

    def hold(self, leases: Sequence[Lease], due: float) -> tuple[int, Record | None]:
        """Release with a delay: ready at the tail at ``due``, the failure count unchanged."""
        done = []
        for lease in leases:
            if self.held(lease):
                self._hold(lease.task_id, due)
                done.append([lease.task_id, due])
        return len(done), ["hold", done] if done else None

    def retry(self, items: Sequence[tuple[Lease, float]], now: float) -> tuple[int, Record | None]:
        done = []
        for lease, delay in items:
            if self.held(lease):
                due = now + (delay if delay > 0 else 0.0)  # NaN counts as 0
                self._retry(lease.task_id, due)
                done.append([lease.task_id, due])
        return len(done), ["retry", done] if done else None

    def bury(self, items: Sequence[tuple[Lease, str]]) -> tuple[int, Record | None]:
        done = []
        for lease, error in items:
            if self.held(lease):
                self._bury(lease.task_id, error[:ERROR_LIMIT])
                done.append([lease.task_id, error[:ERROR_LIMIT]])
        return len(done), ["bury", done] if done else None

    def requeue(self, limit: int | None) -> tuple[int, Record | None]:
        n = len(self.dead) if limit is None else min(max(limit, 0), len(self.dead))
        self._requeue(n)
        return n, ["requeue", n] if n else None

    def clear(self, what: str) -> tuple[None, Record]:
        self._clear(what)
        return None, ["clear", what]

    def add(self, keys: Sequence[bytes]) -> tuple[int, Record | None]:
        new = [k for k in dict.fromkeys(keys) if k not in self.done]
        self.done.update(new)
        return len(new), ["add", new] if new else None

    def remove(self, keys: Sequence[bytes]) -> tuple[int, Record | None]:
        present = [k for k in dict.fromkeys(keys) if k in self.done]
        self.done.difference_update(present)
        return len(present), ["remove", present] if present else None

    def register(self, worker: str, role: str, info: Mapping[str, Any], ttl: float, now: float) -> tuple[str, Record]:
        alias = lowest_free_alias(role, (w.alias for wid, w in self.workers.items() if wid != worker))
        rec = ["register", worker, role, alias, _plain(info), now, float(ttl)]
        self.apply(rec)
        return alias, rec

    def heartbeat(
        self, worker: str, info: Mapping[str, Any], ttl: float, now: float
    ) -> tuple[list[str] | None, Record | None]:
        w = self.workers.get(worker)
        if w is None:
            return None, None
        commands = w.mailbox
        rec = ["heartbeat", worker, _plain(info), now, float(ttl)]
        self.apply(rec)
        return commands, rec

    def unregister(self, worker: str) -> tuple[None, Record | None]:
        tids = [lease.task_id for lease in self.leases_of(worker)]
        if worker not in self.workers and not tids:
            return None, None
        self._drop([worker], tids)
        return None, ["drop", [worker], tids]

    def recover(self, now: float) -> tuple[int, Record | None]:
        expired = [wid for wid, w in self.workers.items() if now - w.last_seen > w.ttl]
        alive = set(self.workers) - set(expired)
        tids = sorted(tid for tid in self.leased if self.tasks[tid].worker not in alive)  # orphans too
        if not expired and not tids:
            return 0, None
        self._drop(expired, tids)
        return len(tids), ["drop", expired, tids]

    def send(self, aliases: Sequence[str], command: str) -> tuple[list[str], Record | None]:
        by_alias = {w.alias: wid for wid, w in self.workers.items()}
        targets = list(dict.fromkeys(by_alias[a] for a in aliases if a in by_alias))
        for wid in targets:
            self.workers[wid].mailbox.append(command)
        return [a for a in aliases if a in by_alias], ["send", targets, command] if targets else None

    # -- reads ----------------------------------------------------------------------

    def stats(self) -> QueueStats:
        return QueueStats(len(self.ready), len(self.delayed), len(self.leased), len(self.dead))

    def dead_letters(self, limit: int) -> list[DeadLetter]:
        return [
            DeadLetter(tid, t.payload, t.key, error, t.failures)
            for tid, (t, error) in itertools.islice(self.dead.items(), max(limit, 0))
        ]

    def leases_of(self, worker: str) -> list[Lease]:
        tids = sorted(tid for tid in self.leased if self.tasks[tid].worker == worker)
        return [
            Lease(t, self.tasks[t].payload, self.tasks[t].key, worker, self.tasks[t].attempt, self.tasks[t].failures)
            for t in tids
        ]

    def worker_list(self, now: float) -> list[WorkerInfo]:
        found = [
            WorkerInfo(wid, w.alias, w.role, dict(w.info), max(now - w.last_seen, 0.0))
            for wid, w in self.workers.items()
        ]
        return sorted(found, key=lambda w: alias_order(w.alias))

    def next_due(self) -> float | None:
        return self.delayed[0][0] if self.delayed else None
