"""The builtin backends give the same answers: seeded random operation sequences, side by side.

Every operation of the queue protocol (and the done set, and the parts of the worker
registry that decide recovery) is applied to the memory backend -- the reference --
and to the backend under test, and every return value, the stats, the dead letters
and the done-set count are compared after each step; at the end both queues are
drained and the full order compared. Task ids are compared through a bijection
(each backend numbers its tasks its own way; the same task must keep its partner).

Times are kept out of the comparison: delays are 0 (or negative or NaN, which count
as 0) or an hour, so a delayed task is either due at the next ``reserve`` or never.
Redis keeps due times in milliseconds: two retries in the same millisecond would be
ordered by task id there but by time here, so the driver waits 2 ms after a retry.

One difference is allowed by the contract and therefore tolerated, not hidden: the
commits of ONE ``commit`` call may be applied one after the other or in three
phases (every ack, every done-set change, every child) -- see
``QueueBackend.commit``. They differ when a unique child of one commit has the key
of a task acked (or a name marked done/undone) by a later commit of the same call.
Each backend's choice is probed first (:func:`commit_phases`); its reference then
applies commit calls the same way (:func:`_phased_commit`), so that batches that
depend on the choice stay in the random sequences.
"""

from __future__ import annotations

import asyncio
import functools
import math
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from achihuo_mini.backend import Commit, DeadLetter, DoneSetBackend, Lease, NewTask, QueueBackend, WorkerRegistry
from achihuo_mini.codec import name_key
from achihuo_mini_backends.memory import MemoryDoneSet, MemoryQueue, drop_namespace
from achihuo_mini_backends.sqlite import SqliteDoneSet, SqliteQueue

K = name_key
NAMES = [K(f"k{i}") for i in range(8)]  # few names: unique pushes collide often
SEEDS = range(24)
STEPS = 200
WORKERS = ("w1", "w2", "w3")
OPERATIONS = [
    *("push", "push", "reserve", "reserve", "reserve", "commit", "commit", "release", "retry", "bury"),
    *("requeue", "recover", "register", "unregister", "leases", "dead", "done", "clear"),
]


# -- the backends ----------------------------------------------------------------------


@dataclass
class Side:
    """One queue/done-set pair; ``phased``: apply commit calls in three phases (a reference only)."""

    name: str
    q: Any  # QueueBackend with WorkerRegistry
    d: Any  # DoneSetBackend
    phased: bool = False
    ids: dict[int, int] = field(default_factory=dict)  # own task id -> reference task id
    ref_ids: dict[int, int] = field(default_factory=dict)  # reference task id -> own task id

    async def commit(self, commits: Sequence[Commit]) -> int:
        return await (_phased_commit(self, commits) if self.phased else self.q.commit(commits))


async def _phased_commit(side: Side, commits: Sequence[Commit]) -> int:
    """The memory queue applying one commit call in the contract's three phases.

    (Not atomic, but nothing else touches the reference between the awaits.)
    """
    applied = [c for c in commits if await side.q.commit([Commit(c.lease)])]  # every ack; fenced ones drop out
    for c in applied:  # every done-set change in commit order
        await side.d.remove(c.undone)
        await side.d.add(c.done)
    for c in applied:  # every child in commit order
        await side.q.push(c.children)
    return len(applied)


Opener = Callable[[str], Awaitable[Side]]


@pytest.fixture
async def open_side(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Callable[[str], Opener]]:
    """``open_side(backend)(namespace)`` opens a queue and its (shared) done set; cleaned up afterwards."""
    opened: list[Side] = []

    def opener(backend: str) -> Opener:
        async def open_(namespace: str) -> Side:
            q: Any
            d: Any
            if backend == "memory":
                q, d = MemoryQueue(namespace), MemoryDoneSet(namespace)
            elif backend == "sqlite":
                path = tmp_path / f"{namespace}.sqlite3"
                q, d = SqliteQueue(namespace, path=path), SqliteDoneSet(namespace, path=path)
            else:
                from achihuo_mini_backends.redis_backend import RedisDoneSet, RedisQueue

                url = request.getfixturevalue("redis_url")
                q, d = RedisQueue(namespace, url=url), RedisDoneSet(namespace, url=url)
            await q.open()
            await d.open()
            assert isinstance(q, QueueBackend) and isinstance(q, WorkerRegistry) and isinstance(d, DoneSetBackend)
            assert q.shares_done_set(d)
            side = Side(backend, q, d)
            opened.append(side)
            return side

        return open_

    yield opener
    for side in opened:
        if side.name == "memory":
            drop_namespace(side.q.namespace)
            continue
        if side.name == "redis":
            for worker in WORKERS:
                await side.q.unregister(worker)
            await side.q.clear("queue")
            await side.q.clear("dead")
            await side.d.remove([*NAMES, K("a"), K("b"), K("x")])  # the names these tests use
            if await side.d.count():  # (clear() unlinks all 65 536 bucket keys: slower)
                await side.d.clear()
        await side.q.close()
        await side.d.close()


BACKENDS = [pytest.param("sqlite", id="sqlite"), pytest.param("redis", marks=pytest.mark.backend_redis, id="redis")]


def _ns(label: str) -> str:
    return f"agree-{label}-{uuid.uuid4().hex[:8]}"


# -- the commit order a backend chose --------------------------------------------------


async def commit_phases(side: Side) -> bool:
    """True when ``side`` applies a commit call in three phases, False when one commit after the other.

    Task ``a`` commits a unique child named like task ``b``, which the same call acks
    after it. One after the other, ``b`` is still pending when the child is checked
    (skipped); in phases, every ack comes first (pushed). The queue must be empty.
    """
    assert await side.q.push([NewTask(b"a", K("a")), NewTask(b"b", K("b"))]) == 2
    la, lb = await side.q.reserve("probe", 2)
    assert (la.payload, lb.payload) == (b"a", b"b")
    child = NewTask(b"child", K("b"), unique=True)
    assert await side.q.commit([Commit(la, children=[child]), Commit(lb)]) == 2
    ready: int = (await side.q.stats()).ready
    assert ready in (0, 1), "a commit call is applied one commit after the other (0) or in phases (1)"
    await side.q.clear("queue")
    return ready == 1


@pytest.mark.parametrize("backend", [pytest.param("memory", id="memory"), *BACKENDS])
async def test_commit_call_is_applied_in_one_of_the_two_documented_orders(
    backend: str, open_side: Callable[[str], Opener]
) -> None:
    """The minimal sequence on which backends may differ, and what each answer must then look like.

    (The SQLite backend in this checkout applies phases -- the child is pushed --
    where memory and Redis skip it. ``QueueBackend.commit`` allows both.)
    """
    side = await open_side(backend)(_ns("phases"))
    phased = await commit_phases(side)
    # The same again with a done-set change instead of an ack: phases apply every
    # done-set change before any child, so they skip here what one-by-one pushes.
    assert await side.q.push([NewTask(b"a", K("a")), NewTask(b"b", K("b"))]) == 2
    la, lb = await side.q.reserve("w", 2)
    child = NewTask(b"child", K("x"), unique=True)
    assert await side.q.commit([Commit(la, children=[child]), Commit(lb, done=[K("x")])]) == 2
    assert [lease.payload for lease in await side.q.reserve("w", 10)] == ([] if phased else [b"child"])
    assert await side.d.contains([K("x")]) == [True]


# -- the random driver -----------------------------------------------------------------


class Diverged(AssertionError):
    pass


def lease_fields(lease: Lease) -> tuple[Any, ...]:
    """Everything of a lease but its task id (each backend numbers its tasks its own way)."""
    return (lease.payload, lease.key, lease.worker, lease.attempt, lease.failures)


class Driver:
    """Applies one seeded random operation sequence to ``sides[0]`` (the reference) and the others."""

    def __init__(self, sides: list[Side], seed: int) -> None:
        self.sides = sides
        self.rng = random.Random(seed)
        self.held: list[list[Lease]] = []  # one lease per side, for the same task
        self.stale: list[list[Lease]] = []
        self.registered: set[str] = set()
        self.counter = 0
        self.log: list[str] = []
        self.slow_clock = any(s.name == "redis" for s in sides)

    # comparison

    async def each(self, call: Callable[[Side], Awaitable[Any]]) -> list[Any]:
        out = []
        for side in self.sides:
            try:
                out.append(await call(side))
            except Exception as exc:  # an exception is an answer too: it must agree
                out.append(f"raised {type(exc).__name__}")
        return out

    def same(self, what: str, answers: list[Any]) -> None:
        for side, answer in zip(self.sides[1:], answers[1:], strict=True):
            if answer != answers[0]:
                raise Diverged(f"{what}: {self.sides[0].name} {answers[0]!r} != {side.name} {answer!r}")

    def task_id(self, side: Side, tid: int, ref: int | None = None) -> int:
        """``tid`` of ``side`` as the reference's id; ``ref``: the reference id it must pair with."""
        if side is self.sides[0]:
            return tid
        if ref is not None and tid not in side.ids and ref not in side.ref_ids:
            side.ids[tid], side.ref_ids[ref] = ref, tid
        if tid not in side.ids or (ref is not None and side.ids[tid] != ref):
            raise Diverged(f"{side.name}: task id {tid} paired with {side.ids.get(tid)}, now with {ref}")
        return side.ids[tid]

    def leases(self, answers: list[list[Lease]], pair: bool = False) -> list[list[tuple[Any, ...]]]:
        ref = answers[0]
        out = []
        for side, leases in zip(self.sides, answers, strict=True):
            if len(leases) != len(ref):
                raise Diverged(f"{side.name}: {len(leases)} leases, reference {len(ref)}")
            out.append(
                [
                    (self.task_id(side, x.task_id, r.task_id if pair else None), *lease_fields(x))
                    for x, r in zip(leases, ref, strict=True)
                ]
            )
        return out

    def letters(self, answers: list[list[DeadLetter]]) -> list[list[tuple[Any, ...]]]:
        return [
            [(self.task_id(side, x.task_id), x.payload, x.key, x.error, x.failures) for x in letters]
            for side, letters in zip(self.sides, answers, strict=True)
        ]

    # operations

    def new_tasks(self, most: int) -> list[NewTask]:
        rng = self.rng
        tasks = []
        for _ in range(rng.randint(0, most)):
            self.counter += 1
            key = rng.choice(NAMES) if rng.random() < 0.75 else None
            delay = 3600.0 if rng.random() < 0.1 else 0.0
            tasks.append(NewTask(f"t{self.counter}".encode(), key, rng.random() < 0.5, rng.random() < 0.3, delay))
        return tasks

    def take(self, most: int) -> list[list[Lease]]:
        """Up to ``most`` held leases, sometimes with a stale one (fenced, or held twice in the call)."""
        rng = self.rng
        rng.shuffle(self.held)
        n = rng.randint(1, most)
        chosen, self.held[:n] = self.held[:n], []
        self.stale.extend(chosen)
        if self.stale and rng.random() < 0.25:
            chosen.append(rng.choice(self.stale))
        return chosen

    def mine(self, side: Side, picks: list[list[Lease]]) -> list[Lease]:
        i = self.sides.index(side)
        return [p[i] for p in picks]

    async def step(self, n: int) -> None:
        rng = self.rng
        op = rng.choice(OPERATIONS)
        self.log.append(op)
        if op == "push":
            tasks = self.new_tasks(5)
            self.same("push", await self.each(lambda s: s.q.push(tasks)))
        elif op == "reserve":
            worker, limit = rng.choice(WORKERS), rng.randint(-1, 4)
            answers = await self.each(lambda s: s.q.reserve(worker, limit))
            self.same("reserve", self.leases(answers, pair=True))
            self.held.extend(list(leases) for leases in zip(*answers, strict=True))
        elif op == "commit" and self.held:
            picks = self.take(3)
            shared = self.new_tasks(4) if rng.random() < 0.3 else None  # the same children in several commits
            plan = []
            for _ in picks:
                done = [rng.choice(NAMES)] if rng.random() < 0.4 else []
                undone = [rng.choice(NAMES)] if rng.random() < 0.3 else []
                plan.append((done, undone, shared if shared is not None else self.new_tasks(3)))
            if len(picks) > 1 and rng.random() < 0.5:  # where the two documented commit orders differ:
                # a unique child named like a task a later commit acks, or a name it marks (un)done
                later = rng.randrange(1, len(picks))
                names = [picks[later][0].key, *plan[later][0], *plan[later][1]]
                if names := [key for key in names if key is not None]:
                    self.counter += 1
                    child = NewTask(f"t{self.counter}".encode(), rng.choice(names), True, rng.random() < 0.3)
                    done, undone, children = plan[later - 1]
                    plan[later - 1] = (done, undone, [*children, child])

            def commits(s: Side) -> list[Commit]:
                return [Commit(lease, d, u, c) for lease, (d, u, c) in zip(self.mine(s, picks), plan, strict=True)]

            self.same("commit", await self.each(lambda s: s.commit(commits(s))))
        elif op == "release" and self.held:
            picks = self.take(3)
            self.same("release", await self.each(lambda s: s.q.release(self.mine(s, picks))))
        elif op == "retry" and self.held:
            picks = self.take(2)
            delay = rng.choice([0.0, 0.0, 0.0, -1.0, math.nan, 3600.0])
            self.same("retry", await self.each(lambda s: s.q.retry([(x, delay) for x in self.mine(s, picks)])))
            if self.slow_clock:
                await asyncio.sleep(0.002)  # Redis due times are milliseconds: keep two retry calls apart
        elif op == "bury" and self.held:
            picks = self.take(2)
            self.same("bury", await self.each(lambda s: s.q.bury([(x, f"err {n}") for x in self.mine(s, picks)])))
        elif op == "requeue":
            how_many = rng.choice([None, 1, 2, 0, -1])
            self.same(f"requeue_dead({how_many})", await self.each(lambda s: s.q.requeue_dead(how_many)))
        elif op == "recover":
            self.same("recover", await self.each(lambda s: s.q.recover()))
        elif op == "register":
            worker = rng.choice(WORKERS)
            if worker not in self.registered:  # the loop registers each incarnation once
                self.registered.add(worker)
                self.same("register", await self.each(lambda s: s.q.register(worker, "slave", {}, 3600)))
        elif op == "unregister":
            worker = rng.choice(WORKERS)
            self.registered.discard(worker)
            await self.each(lambda s: s.q.unregister(worker))
            self.same("workers", await self.each(self.workers))
        elif op == "leases":
            worker = rng.choice(WORKERS)
            self.same(f"leases({worker})", self.leases(await self.each(lambda s: s.q.leases(worker))))
        elif op == "dead":
            limit = rng.randint(-1, 4)
            self.same(f"dead_letters({limit})", self.letters(await self.each(lambda s: s.q.dead_letters(limit))))
        elif op == "done":
            keys = rng.sample(NAMES, rng.randint(0, 3))
            which = rng.choice(["add", "remove", "contains"])
            self.same(f"done.{which}", await self.each(lambda s: getattr(s.d, which)(keys)))
        elif op == "clear" and rng.random() < 0.3:
            what = rng.choice(["queue", "dead"])
            await self.each(lambda s: s.q.clear(what))
            if what == "queue":
                self.stale += self.held
                self.held = []
        self.same("stats", await self.each(lambda s: s.q.stats()))
        self.same("done.count", await self.each(lambda s: s.d.count()))
        self.same("dead_letters", self.letters(await self.each(lambda s: s.q.dead_letters(1000))))

    @staticmethod
    async def workers(side: Side) -> list[tuple[str, str, str]]:
        return [(w.worker, w.alias, w.role) for w in await side.q.workers()]

    async def ack(self, answers: list[list[Lease]], side: Side) -> int:
        return int(await side.q.commit([Commit(x) for x in answers[self.sides.index(side)]]))

    async def run(self, steps: int) -> None:
        try:
            for n in range(steps):
                await self.step(n)
            while True:  # drain: the whole remaining order must agree
                answers = await self.each(lambda s: s.q.reserve("drain", 50))
                self.same("drain", self.leases(answers, pair=True))
                if not answers[0]:
                    break
                await self.each(functools.partial(self.ack, answers))
        except Diverged as exc:
            raise Diverged(f"after {' '.join(self.log[-12:])}: {exc}") from None


@pytest.mark.parametrize("backend", BACKENDS)
async def test_random_operations_agree_with_memory(backend: str, open_side: Callable[[str], Opener]) -> None:
    """Every seed: the same operations give the same answers on ``backend`` and on the memory reference."""
    phased = await commit_phases(await open_side(backend)(_ns("probe")))
    for seed in SEEDS:
        reference = await open_side("memory")(_ns(f"ref{seed}"))
        reference.phased = phased  # commit calls are applied the way the backend applies them (see the top)
        other = await open_side(backend)(_ns(f"{backend}{seed}"))
        try:
            await Driver([reference, other], seed).run(STEPS)
        except Diverged as exc:
            pytest.fail(f"seed {seed}: {exc}")


# -- the divergences the random sequences found (minimal sequences) ----------------------------


@pytest.mark.parametrize("backend", [pytest.param("memory", id="memory"), *BACKENDS])
async def test_nan_and_negative_retry_delay_count_as_zero(backend: str, open_side: Callable[[str], Opener]) -> None:
    """Memory used to keep a task retried with a NaN delay delayed for ever (``max(nan, 0.0)`` is NaN)."""
    side = await open_side(backend)(_ns("nan"))
    await side.q.push([NewTask(b"a"), NewTask(b"b")])
    la, lb = await side.q.reserve("w", 2)
    assert await side.q.retry([(la, math.nan), (lb, -5.0)]) == 2
    again = await side.q.reserve("w", 5)
    assert [(lease.payload, lease.failures) for lease in again] == [(b"a", 1), (b"b", 1)]


@pytest.mark.parametrize("backend", [pytest.param("memory", id="memory"), *BACKENDS])
async def test_requeue_dead_with_a_limit_below_one_requeues_nothing(
    backend: str, open_side: Callable[[str], Opener]
) -> None:
    """Memory used to raise ValueError from ``itertools.islice`` for a negative limit."""
    side = await open_side(backend)(_ns("limit"))
    await side.q.push([NewTask(b"a")])
    (lease,) = await side.q.reserve("w", 1)
    await side.q.bury([(lease, "boom")])
    assert await side.q.requeue_dead(-1) == 0
    assert await side.q.requeue_dead(0) == 0
    assert (await side.q.stats()).dead == 1
    assert await side.q.requeue_dead(None) == 1
