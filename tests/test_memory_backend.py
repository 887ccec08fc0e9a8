"""Memory-backend specifics beyond the contract suite: task ids in push order, the cost per queued task."""

from __future__ import annotations

import asyncio
import heapq
import random
import sys
import threading
import tracemalloc
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator

import pytest

from achihuo_mini.backend import Commit, DeadLetter, Lease, NewTask, QueueStats
from achihuo_mini.codec import name_key
from achihuo_mini_backends.memory import MemoryDoneSet, MemoryQueue, drop_namespace

K = name_key


@pytest.fixture
async def queue() -> AsyncIterator[MemoryQueue]:
    namespace = f"memory-{uuid.uuid4().hex[:8]}"
    q = MemoryQueue(namespace)
    await q.open()
    yield q
    drop_namespace(namespace)


def _payloads(leases: list[Lease]) -> list[bytes]:
    return [lease.payload for lease in leases]


async def test_task_ids_follow_push_order_across_head_and_delayed_pushes(queue: MemoryQueue) -> None:
    batch = [
        NewTask(b"t1"),
        NewTask(b"h1", head=True),
        NewTask(b"t2", K("t2")),
        NewTask(b"d1", delay=3600),
        NewTask(b"h2", K("h2"), head=True),
        NewTask(b"t3"),
    ]
    assert await queue.push(batch) == 6  # ids 1..6
    assert await queue.push([NewTask(b"t4")]) == 1  # 7
    assert await queue.push([NewTask(b"h3", head=True), NewTask(b"h4", head=True)]) == 2  # 8, 9
    assert await queue.stats() == QueueStats(ready=8, delayed=1, leased=0, dead=0)
    first = await queue.reserve("w1", 3)
    assert [(lease.payload, lease.task_id) for lease in first] == [(b"h3", 8), (b"h4", 9), (b"h1", 2)]
    assert await queue.release(first[1:]) == 2
    assert await queue.push([NewTask(b"h5", head=True)]) == 1  # 10
    rest = await queue.reserve("w1", 100)
    assert [(lease.payload, lease.task_id, lease.attempt) for lease in rest] == [
        (b"h5", 10, 1),
        (b"h4", 9, 2),
        (b"h1", 2, 2),
        (b"h2", 5, 1),
        (b"t1", 1, 1),
        (b"t2", 3, 1),
        (b"t3", 6, 1),
        (b"t4", 7, 1),
    ]
    assert rest[3].key == K("h2") and rest[5].key == K("t2") and rest[4].key is None
    assert await queue.leases("w1") == sorted([first[0], *rest], key=lambda lease: lease.task_id)
    assert await queue.stats() == QueueStats(ready=0, delayed=1, leased=9, dead=0)


async def test_task_ids_are_not_reused_after_clear(queue: MemoryQueue) -> None:
    await queue.push([NewTask(b"a"), NewTask(b"b", head=True)])
    before = {lease.task_id for lease in await queue.reserve("w1", 1)}
    await queue.clear("queue")
    assert await queue.stats() == QueueStats(0, 0, 0, 0)
    await queue.push([NewTask(b"c", K("c")), NewTask(b"d", head=True)])
    after = await queue.reserve("w1", 5)
    assert _payloads(after) == [b"d", b"c"]
    assert min(lease.task_id for lease in after) > max(before) and len({lease.task_id for lease in after}) == 2


async def test_reserve_limit_counts_tasks_not_entries(queue: MemoryQueue) -> None:
    """Named tasks and id entries take extra deque entries; ``limit`` and ``stats`` count tasks."""
    await queue.push([NewTask(f"n{i}".encode(), K(f"n{i}")) for i in range(5)])
    await queue.push([NewTask(b"d", delay=3600), NewTask(b"h", K("h"), head=True)])
    await queue.push([NewTask(b"u0"), NewTask(b"u1", K("u1"))])
    assert (await queue.stats()).ready == 8
    got = await queue.reserve("w1", 3)
    assert _payloads(got) == [b"h", b"n0", b"n1"]
    assert await queue.stats() == QueueStats(ready=5, delayed=1, leased=3, dead=0)
    got = await queue.reserve("w1", 5)
    assert _payloads(got) == [b"n2", b"n3", b"n4", b"u0", b"u1"]
    assert await queue.stats() == QueueStats(ready=0, delayed=1, leased=8, dead=0)
    assert await queue.reserve("w1", 5) == []


async def test_a_queued_task_costs_about_its_payload(queue: MemoryQueue) -> None:
    """No per-task record while a task waits for its first lease (issue #8): only a deque entry."""
    n = 20_000
    unnamed = [NewTask(b"%d" % i) for i in range(n)]
    named = [NewTask(b"%d" % i, K(str(i)), unique=True) for i in range(n)]
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        for i in range(0, n, 1000):
            await queue.push(unnamed[i : i + 1000])
        per_unnamed = (tracemalloc.get_traced_memory()[0] - start) / n
        start = tracemalloc.get_traced_memory()[0]
        for i in range(0, n, 1000):
            await queue.push(named[i : i + 1000])
        per_named = (tracemalloc.get_traced_memory()[0] - start) / n
    finally:
        tracemalloc.stop()
    assert (await queue.stats()).ready == 2 * n
    assert per_unnamed < 12, f"{per_unnamed:.1f} bytes per unnamed task besides its payload"
    assert per_named < 80, f"{per_named:.1f} bytes per named task besides its payload and key"


async def test_pushes_from_another_thread(queue: MemoryQueue) -> None:
    """An event loop in another thread may push (head, tail, named) while this one reserves and acks."""
    n, seen = 20_000, []

    async def pusher() -> None:
        for i in range(0, n, 50):
            other = MemoryQueue(queue.namespace)
            await other.push(
                [NewTask(b"%d" % j, K(str(j)) if j % 3 else None, head=j % 7 == 0) for j in range(i, i + 50)]
            )

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        thread = threading.Thread(target=asyncio.run, args=(pusher(),))
        thread.start()
        while thread.is_alive() or (await queue.stats()).ready:
            leases = await queue.reserve("w1", 37)
            seen.extend(leases)
            assert await queue.commit([Commit(lease) for lease in leases]) == len(leases)
        thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert sorted(int(lease.payload) for lease in seen) == list(range(n))
    assert len({lease.task_id for lease in seen}) == n
    assert all((lease.key is None) == (int(lease.payload) % 3 == 0) for lease in seen)
    assert await queue.stats() == QueueStats(0, 0, 0, 0)


# -- against a model with a record and an id per task from its push (the layout before issue #8) ------


class _Record:
    def __init__(self, payload: bytes, key: bytes | None) -> None:
        self.payload, self.key, self.attempt, self.failures, self.worker = payload, key, 0, 0, ""


class _Model:
    """Every task a record under the id of its push."""

    def __init__(self) -> None:
        self.next_id = 1
        self.tasks: dict[int, _Record] = {}
        self.ready: deque[int] = deque()
        self.delayed: list[tuple[int, int]] = []  # (due call number, id); far future for 3600 s
        self.leased: set[int] = set()
        self.pending: Counter[bytes] = Counter()
        self.dead: dict[int, DeadLetter] = {}
        self.done: set[bytes] = set()
        self.calls = 0

    def lease(self, tid: int) -> Lease:
        r = self.tasks[tid]
        return Lease(tid, r.payload, r.key, r.worker, r.attempt, r.failures)

    def push(self, tasks: list[NewTask], check_done: bool = True) -> int:
        head, n = [], 0
        for t in tasks:
            if t.key is not None:
                if t.unique and (self.pending[t.key] > 0 or (check_done and t.key in self.done)):
                    continue
                self.pending[t.key] += 1
            tid, self.next_id, n = self.next_id, self.next_id + 1, n + 1
            self.tasks[tid] = _Record(t.payload, t.key)
            if t.delay:
                heapq.heappush(self.delayed, (1 << 60, tid))
            elif t.head:
                head.append(tid)
            else:
                self.ready.append(tid)
        self.ready.extendleft(reversed(head))
        return n

    def reserve(self, worker: str, limit: int) -> list[Lease]:
        if limit <= 0:
            return []
        while self.delayed and self.delayed[0][0] < self.calls:
            self.ready.append(heapq.heappop(self.delayed)[1])
        out = []
        while len(out) < limit and self.ready:
            tid = self.ready.popleft()
            record = self.tasks[tid]
            record.attempt, record.worker = record.attempt + 1, worker
            self.leased.add(tid)
            out.append(self.lease(tid))
        return out

    def held(self, lease: Lease) -> bool:
        r = self.tasks.get(lease.task_id)
        ok = lease.task_id in self.leased and r is not None and (r.worker, r.attempt) == (lease.worker, lease.attempt)
        if ok:
            self.leased.discard(lease.task_id)
            self.tasks[lease.task_id].worker = ""
        return ok

    def forget(self, tid: int) -> None:
        key = self.tasks.pop(tid).key
        if key is not None:
            self.pending[key] -= 1
            if not self.pending[key]:
                del self.pending[key]

    def commit(self, commits: list[Commit]) -> int:
        n = 0
        for c in commits:
            if self.held(c.lease):
                self.forget(c.lease.task_id)
                self.done.difference_update(c.undone)
                self.done.update(c.done)
                self.push(list(c.children))
                n += 1
        return n

    def release(self, leases: list[Lease]) -> int:
        held = [lease.task_id for lease in leases if self.held(lease)]
        self.ready.extendleft(reversed(held))
        return len(held)

    def retry(self, items: list[tuple[Lease, float]]) -> int:
        n = 0
        for lease, delay in items:
            if self.held(lease):
                self.tasks[lease.task_id].failures += 1
                heapq.heappush(self.delayed, (self.calls if delay == 0 else 1 << 60, lease.task_id))
                n += 1
        return n

    def bury(self, items: list[tuple[Lease, str]]) -> int:
        n = 0
        for lease, error in items:
            if self.held(lease):
                r = self.tasks[lease.task_id]
                self.forget(lease.task_id)
                self.dead[lease.task_id] = DeadLetter(lease.task_id, r.payload, r.key, error, r.failures + 1)
                n += 1
        return n

    def requeue_dead(self, limit: int | None) -> int:
        letters = [self.dead.pop(tid) for tid in list(self.dead)[:limit]]
        return self.push([NewTask(d.payload, d.key) for d in letters], check_done=False)

    def leases(self, worker: str) -> list[Lease]:
        return [self.lease(tid) for tid in sorted(self.leased) if self.tasks[tid].worker == worker]

    def stats(self) -> QueueStats:
        return QueueStats(len(self.ready), len(self.delayed), len(self.leased), len(self.dead))

    def clear(self) -> None:
        self.tasks.clear()
        self.ready.clear()
        self.delayed.clear()
        self.leased.clear()
        self.pending.clear()


@pytest.mark.parametrize("seed", range(20))
async def test_random_operations_match_a_record_per_task(queue: MemoryQueue, seed: int) -> None:
    """Same answers, task ids included, as when every task had its record and id from its push."""
    model, done = _Model(), MemoryDoneSet(queue.namespace)
    rng = random.Random(seed)
    held: list[Lease] = []
    counter = 0

    def new_tasks() -> list[NewTask]:
        nonlocal counter
        out = []
        for _ in range(rng.randint(0, 8)):
            counter += 1
            key = K(f"k{rng.randint(0, 15)}") if rng.random() < 0.6 else None
            delay = 3600.0 if rng.random() < 0.1 else 0.0
            out.append(NewTask(f"t{counter}".encode(), key, rng.random() < 0.5, rng.random() < 0.3, delay))
        return out

    def take(n: int) -> list[Lease]:
        rng.shuffle(held)
        chosen = held[:n]
        del held[:n]
        return chosen + [Lease(lease.task_id, b"", None, lease.worker, lease.attempt + 1, 0) for lease in chosen[:1]]

    for step in range(300):
        model.calls += 1
        op = rng.choice(["push", "push", "reserve", "reserve", "commit", "release", "retry", "bury", "requeue"] * 3)
        op = rng.choice([op, "leases", "unregister", "done", "clear"]) if rng.random() < 0.15 else op
        if op == "push":
            tasks = new_tasks()
            assert await queue.push(tasks) == model.push(tasks), step
        elif op == "reserve":
            worker, limit = rng.choice(["w1", "w2"]), rng.randint(0, 6)
            leases = await queue.reserve(worker, limit)
            assert leases == model.reserve(worker, limit), step
            held.extend(leases)
        elif op == "commit":
            keys = [K(f"k{rng.randint(0, 15)}")]
            commits = [Commit(lease, keys, (), new_tasks()) for lease in take(rng.randint(0, 3))]
            assert await queue.commit(commits) == model.commit(commits), step
        elif op == "release":
            leases = take(rng.randint(0, 4))
            assert await queue.release(leases) == model.release(leases), step
        elif op == "retry":
            items = [(lease, rng.choice([0.0, 3600.0])) for lease in take(rng.randint(0, 3))]
            assert await queue.retry(items) == model.retry(items), step
        elif op == "bury":
            letters = [(lease, f"e{step}") for lease in take(rng.randint(0, 2))]
            assert await queue.bury(letters) == model.bury(letters), step
        elif op == "requeue":
            limit = rng.choice([None, 1, 2])
            assert await queue.requeue_dead(limit) == model.requeue_dead(limit), step
        elif op == "leases":
            assert await queue.leases("w1") == model.leases("w1"), step
        elif op == "unregister":
            worker = rng.choice(["w1", "w2"])
            expected = model.release(model.leases(worker))
            await queue.unregister(worker)
            assert (await queue.stats()).leased == len(model.leased), (step, expected)
        elif op == "done":
            keys = [K(f"k{rng.randint(0, 15)}") for _ in range(2)]
            await done.remove(keys)
            model.done.difference_update(keys)
        else:
            await queue.clear("queue")
            model.clear()
        assert await queue.stats() == model.stats(), step
        assert await queue.dead_letters(1000) == list(model.dead.values()), step
    while leases := await queue.reserve("w3", 7):
        assert leases == model.reserve("w3", 7)
        assert await queue.commit([Commit(lease) for lease in leases]) == len(leases)
    assert model.reserve("w3", 7) == [] and await done.count() == len(model.done)
