"""The backend contract suite. A backend is correct when it passes it.

Use it from a plugin package's tests::

    import pytest
    from achihuo_mini.testing import BackendContract

    class TestMyStore(BackendContract):
        @pytest.fixture
        def backend_name(self):
            return "mystore"

        @pytest.fixture
        def backend_options(self, tmp_path):
            return {"path": tmp_path / "store.db"}

Tests run with pytest-asyncio (``asyncio_mode = "auto"``). Each test uses fresh
namespaces and clears what it created. Registry and notifier tests run only when
the queue declares those abilities (``WorkerRegistry``, ``Notifier``, ``CounterStore``).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from ..backend import (
    Commit,
    CounterStore,
    DoneSetBackend,
    ExpiringDoneSet,
    HostSlots,
    Lease,
    NewTask,
    Notifier,
    QueueBackend,
    QueueStats,
    WorkerRegistry,
    name_key,
)
from ..plugins import build_backend_options, registry
from .contract_abilities import ExpiringDoneSetContract, HostSlotsContract
from .counters import CounterContract
from .helpers import wait_until

__all__ = ["BackendContract", "Backends", "wait_until"]

K = name_key


class Backends:
    """Opens queue/done-set pairs of one backend in fresh namespaces; cleans up after the test."""

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        self.spec = registry.get(name)
        self.options = build_backend_options(self.spec, options, source="test options")
        self.opened: list[QueueBackend | DoneSetBackend] = []
        self.run = uuid.uuid4().hex[:8]

    def namespace(self, label: str = "ns") -> str:
        return f"contract-{self.run}-{label}"

    async def queue(self, namespace: str | None = None) -> QueueBackend:
        assert self.spec.create_queue is not None, f"{self.spec.name} provides no queue"
        q = self.spec.create_queue(namespace or self.namespace(), dict(self.options))
        await q.open()
        self.opened.append(q)
        return q

    async def done_set(self, namespace: str | None = None) -> DoneSetBackend:
        assert self.spec.create_done_set is not None, f"{self.spec.name} provides no done set"
        d = self.spec.create_done_set(namespace or self.namespace(), dict(self.options))
        await d.open()
        self.opened.append(d)
        return d

    async def cleanup(self) -> None:
        for b in reversed(self.opened):
            try:
                if isinstance(b, QueueBackend):
                    await b.clear("queue")
                    await b.clear("dead")
                    if isinstance(b, WorkerRegistry):
                        for w in await b.workers():
                            await b.unregister(w.worker)
                    if isinstance(b, CounterStore):
                        await b.clear_counts()
                else:
                    await b.clear()
            finally:
                await b.close()


def _task(i: int | str, **kw: Any) -> NewTask:
    return NewTask(payload=f"payload-{i}".encode(), **kw)


async def _drain(q: QueueBackend, worker: str = "w1") -> list[bytes]:
    """Reserve everything ready and ack it; return the payloads in order."""
    out: list[bytes] = []
    while leases := await q.reserve(worker, 100):
        out.extend(lease.payload for lease in leases)
        assert await q.commit([Commit(lease) for lease in leases]) == len(leases)
    return out


class BackendContract(CounterContract, ExpiringDoneSetContract, HostSlotsContract):
    """Inherit and provide the ``backend_name`` and ``backend_options`` fixtures.

    The tests of the optional abilities come from the base classes and run only where the
    backend declares them (``WorkerRegistry``, ``Notifier``, ``CounterStore``, ``HostSlots`` on
    the queue, ``ExpiringDoneSet`` on the done set)."""

    @pytest.fixture
    def backend_options(self) -> dict[str, Any]:
        return {}

    @pytest.fixture
    async def backends(self, backend_name: str, backend_options: dict[str, Any]) -> AsyncIterator[Backends]:
        b = Backends(backend_name, backend_options)
        yield b
        await b.cleanup()

    @pytest.fixture
    async def queue(self, backends: Backends) -> QueueBackend:
        return await backends.queue()

    @pytest.fixture
    async def done(self, backends: Backends) -> DoneSetBackend:
        return await backends.done_set()

    # -- declaration ---------------------------------------------------------

    async def test_declares_protocols(self, backends: Backends, queue: QueueBackend, done: DoneSetBackend) -> None:
        assert isinstance(queue, QueueBackend)
        assert isinstance(done, DoneSetBackend)
        assert queue.scope in ("process", "host", "network")
        assert queue.scope == backends.spec.scope
        assert isinstance(queue.location, str) and queue.location
        assert queue.shares_done_set(done), "a queue and done set of one backend and namespace must share"

    async def test_abilities_are_declared_completely(self, queue: QueueBackend, done: DoneSetBackend) -> None:
        """A backend that implements part of an ability would silently lose it (isinstance fails): name the gap."""
        abilities = ((queue, WorkerRegistry), (queue, Notifier), (queue, HostSlots), (queue, CounterStore),
                     (done, ExpiringDoneSet))  # fmt: skip
        for target, ability in abilities:
            methods = [name for name in vars(ability) if not name.startswith("_") and callable(vars(ability)[name])]
            present = [m for m in methods if callable(getattr(target, m, None))]
            missing = sorted(set(methods) - set(present))
            assert not present or not missing, (
                f"{type(target).__name__} implements part of {ability.__name__} ({', '.join(sorted(present))}) "
                f"but not {', '.join(missing)}: the loop would treat it as not having the ability at all"
            )

    # -- push / reserve ------------------------------------------------------

    async def test_empty_queue(self, queue: QueueBackend) -> None:
        assert await queue.reserve("w1", 10) == []
        assert await queue.stats() == QueueStats(0, 0, 0, 0)
        assert await queue.push([]) == 0
        assert await queue.commit([]) == 0
        assert await queue.release([]) == 0
        assert await queue.retry([]) == 0
        assert await queue.bury([]) == 0
        assert await queue.dead_letters() == []
        assert await queue.requeue_dead() == 0

    async def test_reserve_limit_zero(self, queue: QueueBackend) -> None:
        await queue.push([_task(1)])
        assert await queue.reserve("w1", 0) == []
        assert (await queue.stats()).ready == 1

    async def test_push_one_reserve_one(self, queue: QueueBackend) -> None:
        assert await queue.push([_task(1, key=K("one"))]) == 1
        (lease,) = await queue.reserve("w1", 10)
        assert lease.payload == b"payload-1"
        assert lease.key == K("one")
        assert lease.worker == "w1"
        assert lease.attempt == 1
        assert lease.failures == 0
        assert await queue.stats() == QueueStats(ready=0, delayed=0, leased=1, dead=0)
        assert await queue.commit([Commit(lease)]) == 1
        assert await queue.stats() == QueueStats(0, 0, 0, 0)

    @pytest.mark.parametrize("n", [1, 7, 1000])
    async def test_fifo_batches(self, queue: QueueBackend, n: int) -> None:
        assert await queue.push([_task(i) for i in range(n)]) == n
        assert await _drain(queue) == [f"payload-{i}".encode() for i in range(n)]

    async def test_reserve_respects_limit(self, queue: QueueBackend) -> None:
        await queue.push([_task(i) for i in range(10)])
        first = await queue.reserve("w1", 3)
        assert [lease.payload for lease in first] == [b"payload-0", b"payload-1", b"payload-2"]
        assert (await queue.stats()).ready == 7

    async def test_payload_bytes_exact(self, queue: QueueBackend) -> None:
        payloads = [bytes(range(256)), b"\x00" * 10, "名字 🕷".encode(), b"x" * (1 << 20), b""]
        await queue.push([NewTask(p) for p in payloads])
        assert await _drain(queue) == payloads

    async def test_priority_goes_first_in_batch_order(self, queue: QueueBackend) -> None:
        await queue.push([_task("a"), _task("b")])
        await queue.push([_task("p1", head=True), _task("p2", head=True)])
        await queue.push([_task("q1", head=True), _task("q2", head=True)])  # newest head batch first
        await queue.push([_task("c")])
        assert await _drain(queue) == [f"payload-{x}".encode() for x in ["q1", "q2", "p1", "p2", "a", "b", "c"]]

    async def test_mixed_batch(self, queue: QueueBackend) -> None:
        await queue.push([_task("t1"), _task("h1", head=True), _task("t2"), _task("h2", head=True)])
        assert await _drain(queue) == [b"payload-h1", b"payload-h2", b"payload-t1", b"payload-t2"]

    # -- uniqueness ----------------------------------------------------------

    async def test_unique_push_skips_pending(self, queue: QueueBackend) -> None:
        assert await queue.push([_task(1, key=K("x"), unique=True)]) == 1
        assert await queue.push([_task(2, key=K("x"), unique=True)]) == 0
        assert await queue.push([_task(3, key=K("x"))]) == 1, "repeat=True always enqueues"
        assert await queue.push([_task(4, key=K("x"), unique=True)]) == 0, "pending count is 2 now"
        assert (await queue.stats()).ready == 2

    async def test_unique_within_one_batch(self, queue: QueueBackend) -> None:
        batch = [_task(i, key=K("same"), unique=True) for i in range(5)] + [_task("other", key=K("other"), unique=True)]
        assert await queue.push(batch) == 2
        assert await _drain(queue) == [b"payload-0", b"payload-other"]

    async def test_unnamed_never_deduplicated(self, queue: QueueBackend) -> None:
        assert await queue.push([_task(i, unique=True) for i in range(5)]) == 5

    async def test_pending_counts_leased_and_delayed(self, queue: QueueBackend) -> None:
        await queue.push([_task(1, key=K("leased"), unique=True), _task(2, key=K("delayed"), unique=True, delay=60)])
        assert len(await queue.reserve("w1", 10)) == 1
        assert await queue.push([_task(3, key=K("leased"), unique=True), _task(4, key=K("delayed"), unique=True)]) == 0

    async def test_ack_makes_name_addable_again(self, queue: QueueBackend) -> None:
        await queue.push([_task(1, key=K("x"), unique=True)])
        (lease,) = await queue.reserve("w1", 1)
        assert await queue.commit([Commit(lease)]) == 1
        assert await queue.push([_task(2, key=K("x"), unique=True)]) == 1

    async def test_ack_counts_copies(self, queue: QueueBackend) -> None:
        await queue.push([_task(1, key=K("x")), _task(2, key=K("x"))])
        (lease, _) = await queue.reserve("w1", 2)
        await queue.commit([Commit(lease)])
        assert await queue.push([_task(3, key=K("x"), unique=True)]) == 0, "one copy is still leased"

    async def test_unique_push_skips_done_when_shared(self, queue: QueueBackend, done: DoneSetBackend) -> None:
        assert queue.shares_done_set(done)
        await done.add([K("done-name")])
        assert await queue.push([_task(1, key=K("done-name"), unique=True)]) == 0
        assert await queue.push([_task(2, key=K("done-name"))]) == 1, "repeat=True ignores the done set"
        await done.remove([K("done-name")])
        assert await queue.push([_task(3, key=K("fresh"), unique=True)]) == 1

    async def test_own_name_readded_by_handler(self, queue: QueueBackend) -> None:
        """The ack drops the task's own pending count before its children are pushed."""
        await queue.push([_task(1, key=K("page"), unique=True)])
        (lease,) = await queue.reserve("w1", 1)
        assert await queue.commit([Commit(lease, children=[_task(2, key=K("page"), unique=True)])]) == 1
        assert await _drain(queue) == [b"payload-2"]

    # -- commit ----------------------------------------------------------------

    async def test_commit_applies_done_and_children(self, queue: QueueBackend, done: DoneSetBackend) -> None:
        await done.add([K("to-undo")])
        await queue.push([_task("parent", key=K("parent"))])
        (lease,) = await queue.reserve("w1", 1)
        children = [_task("c1", key=K("c1"), unique=True), _task("c2"), _task("c0", head=True)]
        commit = Commit(lease, done=[K("parent"), K("other")], undone=[K("to-undo")], children=children)
        assert await queue.commit([commit]) == 1
        assert await done.contains([K("parent"), K("other"), K("to-undo")]) == [True, True, False]
        assert await _drain(queue) == [b"payload-c0", b"payload-c1", b"payload-c2"]

    async def test_children_unique_against_done(self, queue: QueueBackend, done: DoneSetBackend) -> None:
        await queue.push([_task("parent")])
        (lease,) = await queue.reserve("w1", 1)
        commit = Commit(lease, done=[K("c")], children=[_task("c", key=K("c"), unique=True)])
        assert await queue.commit([commit]) == 1
        assert await _drain(queue) == [], "done names of the commit apply before its children"

    async def test_children_pushed_counts_what_commits_enqueued(
        self, queue: QueueBackend, done: DoneSetBackend
    ) -> None:
        """Optional ``children_pushed`` counter (the loop's "added" vs "skipped"): only enqueued children count."""
        if not hasattr(queue, "children_pushed"):
            return  # the loop then counts every child of an applied commit as added
        await queue.push([_task("a"), _task("b"), _task("taken", key=K("taken"), unique=True)])
        await done.add([K("done")])
        la, lb, _ = await queue.reserve("w1", 3)
        before = queue.children_pushed
        children = [_task("n1", key=K("n1"), unique=True), _task("n1 again", key=K("n1"), unique=True),
                    _task("d", key=K("done"), unique=True), _task("t", key=K("taken"), unique=True), _task("free")]
        stale = Lease(lb.task_id, lb.payload, lb.key, "other", lb.attempt, lb.failures)
        assert await queue.commit([Commit(la, children=children), Commit(stale, children=[_task("x")])]) == 1
        # n1 and free: not the duplicate, the done one, the pending one, nor a fenced commit's child
        assert queue.children_pushed - before == 2

    async def test_commit_batch(self, queue: QueueBackend, done: DoneSetBackend) -> None:
        await queue.push([_task(i, key=K(str(i))) for i in range(50)])
        leases = await queue.reserve("w1", 50)
        commits = [Commit(lease, done=[lease.key] if lease.key else []) for lease in leases]
        assert await queue.commit(commits) == 50
        assert await done.count() == 50
        assert await queue.stats() == QueueStats(0, 0, 0, 0)

    async def test_fenced_commit_writes_nothing(self, queue: QueueBackend, done: DoneSetBackend) -> None:
        await queue.push([_task(1, key=K("x"))])
        (lease,) = await queue.reserve("w1", 1)
        stale_worker = Lease(lease.task_id, lease.payload, lease.key, "w2", lease.attempt, lease.failures)
        stale_attempt = Lease(lease.task_id, lease.payload, lease.key, "w1", lease.attempt + 1, lease.failures)
        for stale in (stale_worker, stale_attempt):
            assert await queue.commit([Commit(stale, done=[K("x")], children=[_task("child")])]) == 0
        assert await done.count() == 0
        assert await queue.stats() == QueueStats(ready=0, delayed=0, leased=1, dead=0)
        assert await queue.release([stale_worker]) == 0
        assert await queue.retry([(stale_attempt, 0)]) == 0
        assert await queue.bury([(stale_worker, "no")]) == 0
        assert await queue.commit([Commit(lease)]) == 1
        assert await queue.commit([Commit(lease)]) == 0, "a second ack of the same lease is fenced"

    async def test_released_then_reserved_fences_old_lease(self, queue: QueueBackend) -> None:
        await queue.push([_task(1)])
        (old,) = await queue.reserve("w1", 1)
        assert await queue.release([old]) == 1
        (new,) = await queue.reserve("w2", 1)
        assert new.task_id == old.task_id and new.attempt == old.attempt + 1
        assert await queue.commit([Commit(old, children=[_task("ghost")])]) == 0
        assert await queue.commit([Commit(new)]) == 1
        assert await queue.stats() == QueueStats(0, 0, 0, 0)

    async def test_mixed_fenced_and_valid_in_one_batch(self, queue: QueueBackend) -> None:
        await queue.push([_task(1), _task(2)])
        a, b = await queue.reserve("w1", 2)
        bad = Lease(b.task_id, b.payload, b.key, "intruder", b.attempt, b.failures)
        assert await queue.commit([Commit(a), Commit(bad, children=[_task("x")])]) == 1
        assert await queue.stats() == QueueStats(ready=0, delayed=0, leased=1, dead=0)

    # -- release / retry / bury ------------------------------------------------

    async def test_release_to_head_in_order(self, queue: QueueBackend) -> None:
        await queue.push([_task(i) for i in range(5)])
        leases = await queue.reserve("w1", 3)
        assert await queue.release(leases) == 3
        again = await queue.reserve("w1", 5)
        assert [lease.payload for lease in again] == [f"payload-{i}".encode() for i in range(5)]
        assert [lease.failures for lease in again] == [0] * 5
        assert [lease.attempt for lease in again] == [2, 2, 2, 1, 1]

    async def test_release_with_delay_goes_to_tail_later_without_a_failure(self, queue: QueueBackend) -> None:
        await queue.push([_task("held", key=K("h"), unique=True)])
        (lease,) = await queue.reserve("w1", 1)
        assert await queue.release([lease], delay=30.0) == 1
        assert await queue.stats() == QueueStats(ready=0, delayed=1, leased=0, dead=0)
        assert await queue.push([_task("dup", key=K("h"), unique=True)]) == 0, "a held-back task is still pending"
        assert await queue.reserve("w1", 5) == []
        assert await queue.release([lease], delay=30.0) == 0, "a released lease is no longer held"

    async def test_release_with_delay_expires_to_tail(self, queue: QueueBackend) -> None:
        await queue.push([_task("held")])
        (lease,) = await queue.reserve("w1", 1)
        assert await queue.release([lease], delay=0.2) == 1
        await queue.push([_task("later")])
        got: list[Lease] = []

        async def ready() -> bool:
            got.extend(await queue.reserve("w1", 5))
            return len(got) == 2

        await wait_until(ready)
        assert [g.payload for g in got] == [b"payload-later", b"payload-held"]
        assert got[1].failures == 0 and got[1].attempt == 2

    async def test_retry_counts_failure_and_delays(self, queue: QueueBackend) -> None:
        await queue.push([_task(1, key=K("r"), unique=True), _task(2)])
        first, _ = await queue.reserve("w1", 2)
        assert await queue.retry([(first, 30.0)]) == 1
        assert await queue.stats() == QueueStats(ready=0, delayed=1, leased=1, dead=0)
        assert await queue.push([_task(3, key=K("r"), unique=True)]) == 0, "a delayed retry is still pending"
        assert await queue.reserve("w1", 5) == []

    async def test_retry_expires_to_tail(self, queue: QueueBackend) -> None:
        await queue.push([_task("failing")])
        (lease,) = await queue.reserve("w1", 1)
        assert await queue.retry([(lease, 0.2)]) == 1
        await queue.push([_task("later")])
        got: list[Lease] = []

        async def ready() -> bool:
            got.extend(await queue.reserve("w1", 5))
            return len(got) == 2

        await wait_until(ready)
        assert [lease.payload for lease in got] == [b"payload-later", b"payload-failing"]
        assert got[1].failures == 1 and got[1].attempt == 2

    async def test_retry_zero_delay(self, queue: QueueBackend) -> None:
        await queue.push([_task(1)])
        (lease,) = await queue.reserve("w1", 1)
        await queue.retry([(lease, 0.0)])
        (again,) = await queue.reserve("w1", 1)
        assert again.failures == 1

    async def test_delayed_push(self, queue: QueueBackend) -> None:
        await queue.push([_task("soon", delay=0.2), _task("far", delay=3600), _task("now")])
        assert await queue.stats() == QueueStats(ready=1, delayed=2, leased=0, dead=0)
        got: list[bytes] = []

        async def soon_is_ready() -> bool:
            got.extend(lease.payload for lease in await queue.reserve("w1", 5))
            return b"payload-soon" in got

        await wait_until(soon_is_ready)
        assert got == [b"payload-now", b"payload-soon"]
        assert (await queue.stats()).delayed == 1

    async def test_bury_and_requeue(self, queue: QueueBackend) -> None:
        await queue.push([_task(1, key=K("bad"), unique=True), _task(2)])
        bad, _ = await queue.reserve("w1", 2)
        long_error = "E" * 5000
        assert await queue.bury([(bad, long_error)]) == 1
        assert await queue.stats() == QueueStats(ready=0, delayed=0, leased=1, dead=1)
        (letter,) = await queue.dead_letters()
        assert letter.payload == b"payload-1" and letter.key == K("bad")
        assert letter.failures == 1
        assert 0 < len(letter.error) <= 2048 and set(letter.error) == {"E"}
        assert await queue.push([_task(3, key=K("bad"), unique=True)]) == 1, "dead letters are not pending"
        assert await queue.requeue_dead() == 1
        assert await queue.dead_letters() == []
        ready = await _drain(queue)
        assert ready == [b"payload-3", b"payload-1"], "requeued dead letters go to the tail"

    async def test_requeue_resets_failures(self, queue: QueueBackend) -> None:
        await queue.push([_task(1)])
        (lease,) = await queue.reserve("w1", 1)
        await queue.retry([(lease, 0)])
        (lease,) = await queue.reserve("w1", 1)
        await queue.bury([(lease, "boom")])
        assert (await queue.dead_letters())[0].failures == 2
        await queue.requeue_dead()
        (again,) = await queue.reserve("w1", 1)
        assert again.failures == 0

    async def test_dead_letters_limit_and_order(self, queue: QueueBackend) -> None:
        await queue.push([_task(i) for i in range(5)])
        leases = await queue.reserve("w1", 5)
        await queue.bury([(lease, f"e{i}") for i, lease in enumerate(leases)])
        letters = await queue.dead_letters(limit=3)
        assert [d.error for d in letters] == ["e0", "e1", "e2"]
        assert await queue.requeue_dead(limit=2) == 2
        assert [d.error for d in await queue.dead_letters()] == ["e2", "e3", "e4"]

    async def test_error_text_unicode(self, queue: QueueBackend) -> None:
        await queue.push([_task(1)])
        (lease,) = await queue.reserve("w1", 1)
        await queue.bury([(lease, "失败: ValueError('🕷')")])
        assert (await queue.dead_letters())[0].error == "失败: ValueError('🕷')"

    # -- stats / clear -----------------------------------------------------------

    async def test_stats_snapshot(self, queue: QueueBackend) -> None:
        await queue.push([_task(i) for i in range(6)] + [_task("d", delay=3600)])
        a, b, _ = await queue.reserve("w1", 3)
        await queue.bury([(a, "x")])
        await queue.retry([(b, 3600)])
        assert await queue.stats() == QueueStats(ready=3, delayed=2, leased=1, dead=1)
        assert (await queue.stats()).active == 6

    async def test_clear(self, queue: QueueBackend, done: DoneSetBackend) -> None:
        await queue.push([_task(i, key=K(str(i)), unique=True) for i in range(4)] + [_task("d", delay=3600)])
        a, b = await queue.reserve("w1", 2)
        await queue.bury([(a, "x")])
        await done.add([K("kept")])
        await queue.clear("queue")
        assert await queue.stats() == QueueStats(0, 0, 0, 1)
        assert await queue.push([_task("again", key=K("2"), unique=True)]) == 1, "pending counts cleared"
        assert await queue.commit([Commit(b)]) == 0, "a cleared lease is gone"
        await queue.clear("dead")
        assert (await queue.stats()).dead == 0
        assert await done.count() == 1, "clearing the queue leaves the done set alone"

    # -- namespaces and names ---------------------------------------------------

    @pytest.mark.parametrize(
        "label",
        ["plain", "with:colons{and}braces*?[x]", "名字-スパイダー-🕷", "l" * 300, "a/b\\c ..", "-"],
    )
    async def test_namespaces_kept_apart(self, backends: Backends, label: str) -> None:
        qa = await backends.queue(backends.namespace(label))
        qb = await backends.queue(backends.namespace(label + "x"))
        da = await backends.done_set(backends.namespace(label))
        db = await backends.done_set(backends.namespace(label + "x"))
        await qa.push([_task("a", key=K("n"), unique=True)])
        await da.add([K("n")])
        assert await qb.stats() == QueueStats(0, 0, 0, 0)
        assert await db.count() == 0
        assert await qb.push([_task("b", key=K("n"), unique=True)]) == 1
        assert await _drain(qb) == [b"payload-b"]
        assert await _drain(qa) == [b"payload-a"]
        assert qa.shares_done_set(da) and not qa.shares_done_set(db)

    async def test_same_namespace_shared_between_instances(self, backends: Backends) -> None:
        ns = backends.namespace("shared")
        q1, q2 = await backends.queue(ns), await backends.queue(ns)
        await q1.push([_task(i) for i in range(100)])
        seen: list[bytes] = []
        while True:
            a, b = await asyncio.gather(q1.reserve("w1", 7), q2.reserve("w2", 7))
            if not a and not b:
                break
            seen += [lease.payload for lease in a + b]
            await q1.commit([Commit(lease) for lease in a])
            await q2.commit([Commit(lease) for lease in b])
        assert sorted(seen) == sorted(f"payload-{i}".encode() for i in range(100))

    @pytest.mark.parametrize("name", ["", "名字", "🕷" * 1000, "x" * 100_000, "\x00nul", "a\udcffb"])
    async def test_any_name(self, queue: QueueBackend, done: DoneSetBackend, name: str) -> None:
        key = K(name)
        assert len(key) == 16
        assert await queue.push([NewTask(b"p", key=key, unique=True)]) == 1
        assert await queue.push([NewTask(b"p", key=key, unique=True)]) == 0
        (lease,) = await queue.reserve("w1", 1)
        assert lease.key == key
        await queue.commit([Commit(lease, done=[key])])
        assert await done.contains([key]) == [True]

    # -- done set ---------------------------------------------------------------

    async def test_done_set_operations(self, done: DoneSetBackend) -> None:
        assert await done.count() == 0
        assert await done.add([]) == 0
        assert await done.contains([]) == []
        assert await done.remove([]) == 0
        assert await done.add([K("a"), K("b"), K("a")]) == 2
        assert await done.add([K("b"), K("c")]) == 1
        assert await done.contains([K("c"), K("zz"), K("a")]) == [True, False, True]
        assert await done.count() == 3
        assert await done.remove([K("a"), K("zz"), K("a")]) == 1
        assert await done.count() == 2
        await done.clear()
        assert await done.count() == 0

    async def test_done_set_many(self, done: DoneSetBackend) -> None:
        keys = [K(f"name-{i}") for i in range(5000)]
        assert await done.add(keys) == 5000
        assert await done.count() == 5000
        assert all(await done.contains(keys[::7]))

    # -- worker registry --------------------------------------------------------

    @pytest.fixture
    def reg(self, queue: QueueBackend) -> WorkerRegistry:
        if not isinstance(queue, WorkerRegistry):
            pytest.skip("backend does not declare the WorkerRegistry ability")  # declared ability, not a missing dep
        return queue

    async def test_registry_aliases(self, reg: WorkerRegistry) -> None:
        assert await reg.register("w-a", "master", {"host": "h"}, 30) == "m1"
        assert await reg.register("w-b", "master", {}, 30) == "m2"
        assert await reg.register("w-c", "slave", {}, 30) == "s1"
        await reg.unregister("w-a")
        assert await reg.register("w-d", "master", {}, 30) == "m1", "lowest free number is reused"
        workers = await reg.workers()
        assert [(w.alias, w.worker, w.role) for w in workers] == [
            ("m1", "w-d", "master"),
            ("m2", "w-b", "master"),
            ("s1", "w-c", "slave"),
        ]

    async def test_registry_aliases_sort_numerically(self, reg: WorkerRegistry) -> None:
        for i in range(11):
            await reg.register(f"w{i}", "slave", {}, 30)
        assert [w.alias for w in await reg.workers()] == [f"s{i}" for i in range(1, 12)]

    async def test_registry_heartbeat_and_mailbox(self, reg: WorkerRegistry) -> None:
        await reg.register("w-a", "master", {"n": 1}, 30)
        await reg.register("w-b", "slave", {}, 30)
        assert await reg.heartbeat("w-a", {"n": 2, "nested": {"x": [1, "y"]}}, 30) == []
        assert await reg.send(["m1", "s9", "s1"], "stop") == ["m1", "s1"]
        assert await reg.heartbeat("w-a", {"n": 3}, 30) == ["stop"]
        assert await reg.heartbeat("w-a", {"n": 3}, 30) == [], "commands are delivered once"
        (m1, _) = await reg.workers()
        assert m1.info == {"n": 3} and m1.age >= 0
        assert await reg.heartbeat("unknown", {}, 30) is None

    async def test_registry_fresh_alias_has_empty_mailbox(self, reg: WorkerRegistry) -> None:
        await reg.register("w-a", "slave", {}, 30)
        await reg.send(["s1"], "stop")
        await reg.unregister("w-a")
        await reg.register("w-b", "slave", {}, 30)
        assert await reg.heartbeat("w-b", {}, 30) == []

    async def test_unregister_releases_leases(self, reg: WorkerRegistry, queue: QueueBackend) -> None:
        await reg.register("w-a", "slave", {}, 30)
        await queue.push([_task(1), _task(2)])
        await queue.reserve("w-a", 1)
        await reg.unregister("w-a")
        assert await queue.stats() == QueueStats(ready=2, delayed=0, leased=0, dead=0)
        assert await _drain(queue) == [b"payload-1", b"payload-2"], "released to the head"

    async def test_recover_dead_worker(self, reg: WorkerRegistry, queue: QueueBackend) -> None:
        await reg.register("alive", "master", {}, 30)
        await reg.register("dying", "slave", {}, 0.3)
        await queue.push([_task(i) for i in range(4)])
        kept = await queue.reserve("alive", 2)
        lost = await queue.reserve("dying", 2)
        assert await reg.recover() == 0, "a fresh heartbeat is alive"
        recovered = 0

        async def dying_expired() -> bool:
            nonlocal recovered
            recovered += await reg.recover()
            return recovered == 2

        await wait_until(dying_expired)
        assert [w.alias for w in await reg.workers()] == ["m1"]
        again = await queue.reserve("alive", 5)
        assert [lease.payload for lease in again] == [lease.payload for lease in lost]
        assert [lease.failures for lease in again] == [0, 0], "recovery does not spend a retry"
        assert await queue.commit([Commit(lease) for lease in lost]) == 0, "the dead worker's late acks are fenced"
        assert await queue.commit([Commit(lease) for lease in kept + again]) == 4
        assert await reg.heartbeat("dying", {}, 0.3) is None, "a recovered worker must re-register"

    async def test_leases_of_a_worker(self, reg: WorkerRegistry, queue: QueueBackend) -> None:
        await reg.register("w-a", "slave", {}, 30)
        assert await reg.leases("w-a") == []
        await queue.push([_task(i, key=K(str(i))) for i in range(5)])
        mine = await queue.reserve("w-a", 3)
        others = await queue.reserve("w-b", 1)
        held = await reg.leases("w-a")
        assert held == mine, "the same leases, oldest first, with their fencing tokens"
        assert await reg.leases("w-b") == others
        assert await queue.release(held[1:]) == 2, "leases found this way can be released"
        assert await reg.leases("w-a") == mine[:1]
        await queue.commit([Commit(mine[0])])
        assert await reg.leases("w-a") == []

    async def test_recover_orphan_leases(self, reg: WorkerRegistry, queue: QueueBackend) -> None:
        await queue.push([_task(1)])
        await queue.reserve("never-registered", 1)
        assert await reg.recover() == 1
        assert (await queue.stats()).ready == 1

    # -- notifier -----------------------------------------------------------------

    async def test_notifier(self, backends: Backends, queue: QueueBackend) -> None:
        if not isinstance(queue, Notifier):
            pytest.skip("backend does not declare the Notifier ability")
        started = time.monotonic()
        await queue.wait_for_tasks(0.05)
        assert time.monotonic() - started < 5
        other = await backends.queue()  # same namespace, another instance
        waiter = asyncio.ensure_future(queue.wait_for_tasks(30))
        await asyncio.sleep(0.05)  # let the waiter start waiting; the push below must wake it
        await other.push([_task(1)])
        await asyncio.wait_for(waiter, 10)
        await queue.wait_for_tasks(30)  # tasks are ready: returns at once
