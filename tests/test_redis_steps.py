"""Our own writes never hold Redis for long: big calls run as several bounded script calls.

A step handles at most STEP_ITEMS tasks (or names, or leases) and STEP_BYTES payload
bytes; the hot path with small batches stays one script call per protocol call. Steps
are counted with ``round_trips`` (speed is not asserted here; the measured figures are
in the package docstring).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio

from achihuo_mini.backend import Commit, NewTask, QueueStats
from achihuo_mini.backend import name_key as K
from achihuo_mini_backends.redis_backend import RedisDoneSet, RedisQueue, redis_key
from achihuo_mini_backends.redis_backend.connection import STEP_ITEMS

from . import test_redis_backend as base
from .conftest import RedisServer

names, opened, open_queue, open_done, plain = base.names, base.opened, base.open_queue, base.open_done, base.plain


def _unique(name: str, **kw: Any) -> NewTask:
    return NewTask(name.encode(), K(name), unique=True, **kw)


async def test_small_batches_stay_one_call(names: Callable[[str], str], open_queue: Any) -> None:
    q: RedisQueue = await open_queue(names("hot"))
    before = q.round_trips
    await q.push([_unique(f"t{i}") for i in range(100)])
    leases = await q.reserve("w", 100)
    await q.commit(
        [Commit(lease, done=[lease.key or b""], children=[_unique(f"c{i}")]) for i, lease in enumerate(leases)]
    )
    assert q.round_trips - before == 3


async def test_a_commit_of_200000_children_runs_in_bounded_steps(
    names: Callable[[str], str], open_queue: Any, open_done: Any, plain: redis.asyncio.Redis
) -> None:
    ns = names("huge")
    q: RedisQueue = await open_queue(ns)
    d: RedisDoneSet = await open_done(ns)
    await q.push([_unique("parent")])
    (lease,) = await q.reserve("w", 1)
    n = 200_000
    children = [_unique(f"c{i}") for i in range(n)]
    children += [_unique("c7"), _unique("parent")]  # a duplicate across steps; the task's own name again
    done = [K(f"d{i}") for i in range(12_000)]
    before = q.round_trips
    assert await q.commit([Commit(lease, done=done, children=children)]) == 1
    steps = q.round_trips - before
    print(f"{steps} script calls for {n} children and {len(done)} done names")
    assert steps == -(-len(done) // STEP_ITEMS) + -(-(n + 1) // STEP_ITEMS) + 1, "done, children, then the ack"
    assert await q.stats() == QueueStats(ready=n + 1, delayed=0, leased=0, dead=0), "acked, every child arrived"
    assert await d.count() == len(done)
    pending = redis_key(ns, "pending")
    assert await plain.hlen(pending) == n + 1
    assert await plain.hget(pending, K("c7")) == b"1" and await plain.hget(pending, K("parent")) == b"1"
    assert await q.push([_unique("c199999"), _unique("d5"), _unique("new")]) == 1, "pending and done hold"
    await q.clear("queue")
    await d.clear()


async def test_a_lease_lost_midway_writes_no_further_children(
    names: Callable[[str], str], open_queue: Any, plain: redis.asyncio.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    ns = names("fenced")
    q: RedisQueue = await open_queue(ns)
    await q.push([_unique("parent")])
    (lease,) = await q.reserve("w", 1)
    children = [_unique(f"c{i}") for i in range(3 * STEP_ITEMS)]
    calls: list[str] = []
    call = q._call

    async def spy(name: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(name)
        if len(calls) == 2:  # between the first and the second step, another worker takes the task over
            await plain.hset(redis_key(ns, "leased"), str(lease.task_id), b"2:other-worker")
        return await call(name, *args, **kwargs)

    monkeypatch.setattr(q, "_call", spy)
    assert await q.commit([Commit(lease, children=children)]) == 0, "fenced"
    assert calls == ["commit", "commit"], "no step runs after the one that found the lease gone"
    assert await q.stats() == QueueStats(ready=STEP_ITEMS, delayed=0, leased=1, dead=0), (
        "the first step's children stay (the handler runs again: duplicates, never a loss); the task stays"
    )


async def test_big_pushes_keep_order_and_uniqueness(names: Callable[[str], str], open_queue: Any) -> None:
    q: RedisQueue = await open_queue(names("push"))
    await q.push([NewTask(b"old")])
    n = 2 * STEP_ITEMS + 10
    heads = [NewTask(b"h%d" % i, head=True) for i in range(n)]
    tails = [NewTask(b"t%d" % i) for i in range(n)]
    dups = [_unique("k0", head=True), NewTask(b"k1", K("k1")), *heads, *tails, _unique("k0"), _unique("k1")]
    before = q.round_trips
    assert await q.push(dups) == 2 * n + 2, "a unique copy after an earlier one of its key is skipped"
    assert q.round_trips - before > 2
    got = [lease.payload for lease in await q.reserve("w", 3 * n)]
    expected = [b"k0", *(h.payload for h in heads), b"old", b"k1", *(t.payload for t in tails)]
    assert got == expected, "head tasks in batch order before what was there; tail tasks after"


async def test_big_releases_requeues_and_listings(names: Callable[[str], str], open_queue: Any) -> None:
    q: RedisQueue = await open_queue(names("release"))
    n = 2 * STEP_ITEMS + 3
    await q.push([NewTask(b"%d" % i) for i in range(n)])
    leases = await q.reserve("w", n)
    assert len(leases) == n
    before = q.round_trips
    assert await q.release(leases) == n
    assert q.round_trips - before == 3
    leases = await q.reserve("w", n)
    assert [lease.payload for lease in leases] == [b"%d" % i for i in range(n)], "released in order to the head"
    assert await q.bury([(lease, "x") for lease in leases]) == n
    letters = await q.dead_letters(n + 10)
    assert [letter.payload for letter in letters] == [b"%d" % i for i in range(n)]
    assert await q.requeue_dead(STEP_ITEMS + 1) == STEP_ITEMS + 1
    assert await q.requeue_dead() == n - STEP_ITEMS - 1
    assert await q.stats() == QueueStats(ready=n, delayed=0, leased=0, dead=0)
    leases = await q.reserve("w", n)
    assert await q.retry([(lease, 3600) for lease in leases]) == n
    assert await q.stats() == QueueStats(ready=0, delayed=n, leased=0, dead=0)


async def test_longest_step_by_slowlog() -> None:
    """Prints the server-side time of the longest script step (SLOWLOG on a private server).

    Speed is not asserted. The figures in the package docstring came from
    ``ACHIHUO_STEP_N=200000 python -m pytest -q -s tests/test_redis_steps.py -k slowlog``.
    """
    n = int(os.environ.get("ACHIHUO_STEP_N", "5000"))
    server = RedisServer().start()
    admin = redis.asyncio.Redis.from_url(server.url, socket_timeout=120)
    q = RedisQueue("slowlog", url=server.url, socket_timeout=120)
    d = RedisDoneSet("slowlog", url=server.url, socket_timeout=120)
    try:
        await q.open()
        await d.open()
        # Redis 7 logs the commands a script runs too: only calls over 0.5 ms are logged
        await admin.config_set("slowlog-log-slower-than", 500)
        await admin.config_set("slowlog-max-len", 100_000)
        payload = b"x" * 100

        async def measure(label: str, call: Any) -> Any:
            await admin.slowlog_reset()
            before = q.round_trips + d.round_trips
            result = await call
            steps = q.round_trips + d.round_trips - before
            log = await admin.execute_command("SLOWLOG", "GET", "-1", NEVER_DECODE=True)
            micros = sorted(int(e[2]) for e in log if e[3][0].upper() == b"EVALSHA") or [0]
            print(f"{label:44} {steps:4d} steps, longest {micros[-1] / 1000:6.2f} ms, median "
                  f"{micros[len(micros) // 2] / 1000:6.2f} ms")  # fmt: skip
            return result

        await measure(f"push {n}", q.push([NewTask(payload, K(f"p{i}"), unique=True) for i in range(n)]))
        leases = await measure(f"reserve {n}", q.reserve("w", n))
        children = [NewTask(payload, K(f"c{i}"), unique=True) for i in range(n)]
        done = [K(f"d{i}") for i in range(n // 10)]
        await measure(f"commit of {n} children, {n // 10} done", q.commit([Commit(leases[0], done, (), children)]))
        await measure(f"commit {n - 1} small", q.commit([Commit(lease, [lease.key or b""]) for lease in leases[1:]]))
        leases = await measure(f"reserve {n}", q.reserve("w", n))
        await measure(f"bury {n}", q.bury([(lease, "boom") for lease in leases]))
        await measure(f"requeue {n}", q.requeue_dead())
        await measure("done clear", d.clear())
    finally:
        await q.close()
        await d.close()
        await admin.aclose()
        server.remove()
