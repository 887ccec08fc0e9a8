"""SQLite-specific behaviour beyond the contract suite: files, schema, processes, the event loop."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import sqlite3
import stat
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import closing
from pathlib import Path
from typing import Any, TypeVar

import pytest

from achihuo_mini.backend import Commit, Lease, NewTask, QueueStats
from achihuo_mini.codec import name_key
from achihuo_mini.config import build_backend_options
from achihuo_mini.errors import BackendError, BackendUnavailable, ConfigError
from achihuo_mini.plugins import registry, safe_filename
from achihuo_mini_backends import sqlite as sqlite_backend
from achihuo_mini_backends.memory import MemoryDoneSet, MemoryQueue, drop_namespace
from achihuo_mini_backends.sqlite import SCHEMA_VERSION, SqliteDoneSet, SqliteQueue

WORKER_SCRIPT = Path(__file__).parent / "procs" / "queue_worker.py"
K = name_key
_T = TypeVar("_T")


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "data" / "loops.sqlite3"


@pytest.fixture
async def opened() -> AsyncIterator[list[SqliteQueue | SqliteDoneSet]]:
    """Backends a test opened; closed afterwards."""
    backends: list[SqliteQueue | SqliteDoneSet] = []
    yield backends
    for b in backends:
        await b.close()


async def _queue(opened: list[Any], namespace: str, path: Path, **options: Any) -> SqliteQueue:
    q = SqliteQueue(namespace, path=path, **options)
    await q.open()
    opened.append(q)
    return q


async def _done(opened: list[Any], namespace: str, path: Path) -> SqliteDoneSet:
    d = SqliteDoneSet(namespace, path=path)
    await d.open()
    opened.append(d)
    return d


def _check_consistent(path: Path, namespace: str) -> None:
    """The namespace counters and pending counts agree with the rows they summarise."""
    with closing(sqlite3.connect(path)) as c, c:
        row = c.execute(
            "SELECT id, ready, delayed, leased, dead, done FROM namespaces WHERE name = ?", (namespace.encode(),)
        ).fetchone()
        ns, counters = row[0], row[1:]
        real = c.execute(
            "SELECT (SELECT count(*) FROM tasks WHERE ns = :ns AND pos IS NOT NULL),"
            " (SELECT count(*) FROM tasks WHERE ns = :ns AND due IS NOT NULL),"
            " (SELECT count(*) FROM tasks WHERE ns = :ns AND worker IS NOT NULL),"
            " (SELECT count(*) FROM dead WHERE ns = :ns),"
            " (SELECT count(*) FROM done WHERE ns = :ns)",
            {"ns": ns},
        ).fetchone()
        assert tuple(counters) == tuple(real)
        keyed = dict(c.execute("SELECT key, count(*) FROM tasks WHERE ns = ? AND key IS NOT NULL GROUP BY key", (ns,)))
        pending = dict(c.execute("SELECT key, n FROM pending WHERE ns = ?", (ns,)))
        assert keyed == pending
    c.close()


def _mode(path: Path) -> int:
    """Permission bits of ``path`` (fails when it does not exist)."""
    return stat.S_IMODE(path.stat().st_mode)


def _resolved(path: Path) -> Path:
    return path.resolve()


def _write(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


def _new_sqlite_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    """Backend worker threads alive now that were not alive at ``before``."""
    return [t for t in threading.enumerate() if t not in before and t.name.startswith("achihuo-sqlite")]


async def _wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# -- files -------------------------------------------------------------------------


async def test_file_created_0600_in_wal_mode(db: Path, opened: list[Any]) -> None:
    assert not db.parent.exists()
    q = await _queue(opened, "files", db)
    assert await q.push([NewTask(b"x")]) == 1  # the WAL file exists once something was written
    assert _mode(db) == 0o600
    assert _mode(db.parent) == 0o700
    for suffix in ("-wal", "-shm"):
        assert _mode(db.with_name(db.name + suffix)) == 0o600, suffix
    with closing(sqlite3.connect(db)) as c, c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert q.location == str(db) and str(db) in repr(q)
    assert q.durability == "always", "synchronous = FULL: a commit survives a power loss"


async def test_default_path_under_xdg_data_home(opened: list[Any]) -> None:
    spec = registry.get("sqlite")
    assert spec.scope == "host"
    assert set(spec.options) >= {"path", "busy_timeout"}
    options = build_backend_options(spec, {}, source="test")
    assert options["path"] is None and options["busy_timeout"] == 30.0
    name = "My Spider/名字"
    assert spec.create_queue is not None and spec.create_done_set is not None
    q = spec.create_queue(name, dict(options))
    d = spec.create_done_set(name, dict(options))
    expected = _resolved(Path(os.environ["XDG_DATA_HOME"])) / "achihuo_mini" / (safe_filename(name) + ".sqlite3")
    assert q.location == d.location == str(expected)
    await q.open()
    opened.append(q)
    await d.open()
    opened.append(d)
    assert _mode(expected) == 0o600
    assert q.shares_done_set(d)


async def test_bad_options_are_config_errors(db: Path) -> None:
    with pytest.raises(ConfigError, match="busy_timeout"):
        SqliteQueue("x", path=db, busy_timeout=-1)
    with pytest.raises(ConfigError, match="poll_interval"):
        SqliteQueue("x", path=db, poll_interval=0)


async def test_shares_done_set_only_same_file_and_namespace(tmp_path: Path) -> None:
    q = SqliteQueue("a", path=tmp_path / "one.sqlite3")
    assert q.shares_done_set(SqliteDoneSet("a", path=tmp_path / "sub" / ".." / "one.sqlite3"))
    assert not q.shares_done_set(SqliteDoneSet("b", path=tmp_path / "one.sqlite3"))
    assert not q.shares_done_set(SqliteDoneSet("a", path=tmp_path / "two.sqlite3"))
    assert not q.shares_done_set(MemoryDoneSet("a"))


# -- several loops in one file -------------------------------------------------------


async def test_two_namespaces_in_one_file(db: Path, opened: list[Any]) -> None:
    qa, qb = await _queue(opened, "loop-a", db), await _queue(opened, "loop-b", db)
    da, db_ = await _done(opened, "loop-a", db), await _done(opened, "loop-b", db)
    assert qa.shares_done_set(da) and not qa.shares_done_set(db_)
    await qa.push([NewTask(b"a1", key=K("n"), unique=True), NewTask(b"a2"), NewTask(b"a3", delay=3600)])
    await da.add([K("done-a")])
    assert await qb.push([NewTask(b"b1", key=K("n"), unique=True)]) == 1, "pending of loop-a is not loop-b's"
    assert await qb.push([NewTask(b"b2", key=K("done-a"), unique=True)]) == 1, "done of loop-a is not loop-b's"
    assert await qa.push([NewTask(b"a4", key=K("done-a"), unique=True)]) == 0
    (lease_a,) = await qa.reserve("w", 1)
    await qa.bury([(lease_a, "boom")])
    assert await qa.stats() == QueueStats(ready=1, delayed=1, leased=0, dead=1)
    assert await qb.stats() == QueueStats(ready=2, delayed=0, leased=0, dead=0)
    assert await qb.dead_letters() == []
    assert (await da.count(), await db_.count()) == (1, 0)
    assert await qa.register("wa", "master", {}, 30) == "m1"
    assert await qb.register("wb", "master", {}, 30) == "m1", "aliases are per loop"
    assert await qb.send(["m1"], "stop") == ["m1"]
    assert await qa.heartbeat("wa", {}, 30) == [], "commands are per loop"
    assert await qb.heartbeat("wb", {}, 30) == ["stop"]
    assert await qa.recover() == 0
    await qb.clear("queue")
    assert await qa.stats() == QueueStats(ready=1, delayed=1, leased=0, dead=1)
    assert [lease.payload for lease in await qa.reserve("w", 5)] == [b"a2"]
    for ns in ("loop-a", "loop-b"):
        _check_consistent(db, ns)


# -- schema and bad files ------------------------------------------------------------


async def test_newer_schema_is_refused(db: Path, opened: list[Any]) -> None:
    q = await _queue(opened, "x", db)
    await q.close()
    with closing(sqlite3.connect(db)) as c, c:
        c.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    before = set(threading.enumerate())
    with pytest.raises(BackendError, match=rf"schema version {SCHEMA_VERSION + 1} .*newer achihuo_mini") as info:
        await SqliteQueue("x", path=db).open()
    assert not isinstance(info.value, BackendUnavailable)
    assert str(db) in str(info.value)
    await _wait_for(lambda: not _new_sqlite_threads(before))  # a failed open stops its thread


async def test_foreign_database_is_refused(db: Path) -> None:
    db.parent.mkdir()
    with closing(sqlite3.connect(db)) as c, c:
        c.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
    with pytest.raises(BackendError, match="another application"):
        await SqliteQueue("x", path=db).open()


@pytest.mark.parametrize("content", [b"this is not a database\n" * 200, os.urandom(8192)])
async def test_not_a_database_is_a_clear_error(db: Path, content: bytes) -> None:
    _write(db, content)
    q = SqliteQueue("x", path=db)
    with pytest.raises(BackendError, match="not an SQLite database") as info:
        await q.open()
    assert type(info.value) is BackendError, "retrying will not help: not BackendUnavailable"
    assert isinstance(info.value.__cause__, sqlite3.DatabaseError)
    assert str(db) in str(info.value)
    with pytest.raises(BackendError, match="not open"):
        await q.stats()


async def test_close_is_idempotent_and_stops_the_thread(db: Path) -> None:
    before = set(threading.enumerate())
    q = SqliteQueue("x", path=db)
    await q.open()
    await q.push([NewTask(b"x")])
    (own,) = _new_sqlite_threads(before)
    await q.close()
    await q.close()
    await _wait_for(lambda: not own.is_alive())
    with pytest.raises(BackendError, match="not open"):
        await q.push([NewTask(b"y")])
    await q.open()  # reopening works and sees the data
    assert (await q.stats()).ready == 1
    await q.close()


async def test_concurrent_open_waits_for_the_connection(db: Path) -> None:
    q = SqliteQueue("x", path=db)
    await asyncio.gather(q.open(), q.open(), q.open())
    assert await q.push([NewTask(b"x")]) == 1
    await q.close()
    _write(db.with_name("garbage.sqlite3"), b"not a database" * 100)
    bad = SqliteQueue("x", path=db.with_name("garbage.sqlite3"))
    results = await asyncio.gather(bad.open(), bad.open(), return_exceptions=True)
    assert all(isinstance(r, BackendError) for r in results), results
    await bad.close()


async def test_lock_wait_happens_off_the_event_loop(db: Path, opened: list[Any]) -> None:
    """Another process holds the write lock: the call waits busy_timeout in its thread, then is unavailable."""
    q = await _queue(opened, "x", db, busy_timeout=0.5)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        gaps: list[float] = []
        stop = asyncio.Event()

        async def monitor() -> None:
            while not stop.is_set():
                t = time.perf_counter()
                await asyncio.sleep(0.001)
                gaps.append(time.perf_counter() - t)

        task = asyncio.ensure_future(monitor())
        started = time.monotonic()
        with pytest.raises(BackendUnavailable, match="locked") as info:
            await q.push([NewTask(b"x")])
        waited = time.monotonic() - started
        stop.set()
        await task
        assert isinstance(info.value.__cause__, sqlite3.OperationalError)
        assert waited >= 0.4
        assert len(gaps) > 20 and max(gaps) < 0.2, f"event loop blocked for {max(gaps):.3f} s"
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert await q.push([NewTask(b"x")]) == 1


def test_hot_queries_use_indexes(tmp_path: Path) -> None:
    path = tmp_path / "plan.sqlite3"
    asyncio.run(_create(path))
    with closing(sqlite3.connect(path)) as c, c:
        for name in dir(sqlite_backend):
            if not name.startswith("SQL_") or not name.isupper():
                continue
            sql: str = getattr(sqlite_backend, name)
            if not sql.lstrip().upper().startswith("SELECT"):
                continue
            plan = " | ".join(row[3] for row in c.execute("EXPLAIN QUERY PLAN " + sql, (1,) * sql.count("?")))
            assert "SCAN" not in plan, f"{name}: {plan}"
            assert "TEMP B-TREE" not in plan or name == "SQL_ORPHANS", f"{name}: {plan}"
    c.close()


def test_batch_statements_use_indexes(tmp_path: Path) -> None:
    """The set-based statements look rows up by key (they scan only their own VALUES rows)."""
    path = tmp_path / "plan.sqlite3"
    asyncio.run(_create(path))
    rows = {"BATCH_HELD": "(?, ?, ?, ?)", "BATCH_INSERT": "(?, ?, ?, ?, ?)", "BATCH_PENDING_ADD": "(?, ?, ?)"}
    rows["BATCH_DONE_ADD"] = "(?, ?)"
    rows["BATCH_DONE_EXPIRE"] = "(?, ?, ?)"
    names = [name for name in dir(sqlite_backend) if name.startswith("BATCH_")]
    assert len(names) == 13
    with closing(sqlite3.connect(path)) as c, c:
        for name in names:
            sql = sqlite_backend._batch(getattr(sqlite_backend, name), 4, rows.get(name, "?"))
            plan = [r[3] for r in c.execute("EXPLAIN QUERY PLAN " + sql, (1,) * sql.count("?"))]
            scans = [step for step in plan if re.match(r"SCAN (tasks|pending|done|dead|namespaces)\b", step)]
            assert not scans, f"{name}: {plan}"
            assert "TEMP B-TREE" not in " | ".join(plan), f"{name}: {plan}"


async def _create(path: Path) -> None:
    q = SqliteQueue("x", path=path)
    await q.open()
    await q.close()


# -- same semantics as the reference (memory) backend ------------------------------------


async def test_random_operations_match_memory_backend(db: Path, opened: list[Any]) -> None:
    """A seeded random sequence of every operation gives the same answers as the memory backend."""
    namespace = f"diff-{uuid.uuid4().hex[:8]}"
    mq, md = MemoryQueue(namespace), MemoryDoneSet(namespace)
    sq, sd = await _queue(opened, namespace, db), await _done(opened, namespace, db)
    rng = random.Random(1234)
    held: list[tuple[Lease, Lease]] = []  # (memory lease, sqlite lease) pairs
    stale: list[tuple[Lease, Lease]] = []
    counter = 0

    def new_tasks() -> list[NewTask]:
        nonlocal counter
        out = []
        for _ in range(rng.randint(0, 6)):
            counter += 1
            key = K(f"k{rng.randint(0, 12)}") if rng.random() < 0.7 else None
            delay = 3600.0 if rng.random() < 0.1 else 0.0
            out.append(NewTask(f"t{counter}".encode(), key, rng.random() < 0.5, rng.random() < 0.3, delay))
        return out

    def take(n: int) -> list[tuple[Lease, Lease]]:
        rng.shuffle(held)
        chosen = held[:n]
        del held[:n]
        stale.extend(chosen)
        return chosen + ([rng.choice(stale)] if stale and rng.random() < 0.3 else [])

    try:
        for step in range(400):
            op = rng.choice(["push", "reserve", "reserve", "commit", "release", "retry", "bury", "requeue", "done"])
            if op == "push":
                tasks = new_tasks()
                assert await mq.push(tasks) == await sq.push(tasks), step
            elif op == "reserve":
                worker, limit = rng.choice(["w1", "w2"]), rng.randint(1, 5)  # memory promotes even at 0
                m, s = await mq.reserve(worker, limit), await sq.reserve(worker, limit)
                assert [(x.payload, x.key, x.attempt, x.failures) for x in m] == [
                    (x.payload, x.key, x.attempt, x.failures) for x in s
                ], step
                held.extend(zip(m, s, strict=True))
            elif op == "commit":
                pairs = take(rng.randint(0, 3))
                done = [K(f"k{rng.randint(0, 12)}")] if rng.random() < 0.5 else []
                undone = [K(f"k{rng.randint(0, 12)}")] if rng.random() < 0.3 else []
                children = new_tasks()
                m_n = await mq.commit([Commit(a, done, undone, children) for a, _ in pairs])
                assert m_n == await sq.commit([Commit(b, done, undone, children) for _, b in pairs]), step
            elif op == "release":
                pairs = take(rng.randint(0, 3))
                delay = 3600.0 if rng.random() < 0.3 else 0.0  # held back at the tail, or to the head
                m_n = await mq.release([a for a, _ in pairs], delay)
                assert m_n == await sq.release([b for _, b in pairs], delay), step
            elif op == "retry":
                pairs = take(rng.randint(0, 2))
                assert await mq.retry([(a, 0.0) for a, _ in pairs]) == await sq.retry([(b, 0.0) for _, b in pairs])
            elif op == "bury":
                pairs = take(rng.randint(0, 2))
                m_n = await mq.bury([(a, f"err {step}") for a, _ in pairs])
                assert m_n == await sq.bury([(b, f"err {step}") for _, b in pairs]), step
            elif op == "requeue":
                how_many = rng.choice([None, 1, 2])
                assert await mq.requeue_dead(how_many) == await sq.requeue_dead(how_many), step
            else:
                keys = [K(f"k{rng.randint(0, 12)}") for _ in range(3)]
                assert await md.add(keys) == await sd.add(keys)
                assert await md.remove(keys[:1]) == await sd.remove(keys[:1])
            assert await mq.stats() == await sq.stats(), step
            assert await md.count() == await sd.count(), step
            m_dead, s_dead = await mq.dead_letters(), await sq.dead_letters()
            assert [(d.payload, d.key, d.error, d.failures) for d in m_dead] == [
                (d.payload, d.key, d.error, d.failures) for d in s_dead
            ], step
        _check_consistent(db, namespace)
    finally:
        drop_namespace(namespace)


# -- set-based commit, push and reserve -------------------------------------------------


async def _statements(q: SqliteQueue, call: Awaitable[_T]) -> tuple[_T, list[str]]:
    """``await call`` (a call of ``q`` not started yet) and the SQL statements it ran, BEGIN/COMMIT aside."""
    seen: list[str] = []
    await q._call(lambda c: c.set_trace_callback(seen.append), mode="none")
    try:
        result = await call
    finally:
        await q._call(lambda c: c.set_trace_callback(None), mode="none")
    return result, [s for s in seen if s not in ("BEGIN IMMEDIATE", "COMMIT")]


async def _payloads(q: SqliteQueue) -> list[bytes]:
    """Reserve everything ready, in order; the payloads."""
    return [lease.payload for lease in await q.reserve("drain", 1_000_000)]


async def test_commit_batch_mixes_held_and_fenced_leases(db: Path, opened: list[Any]) -> None:
    q, d = await _queue(opened, "mixed", db), await _done(opened, "mixed", db)
    await d.add([K("pre-done")])
    assert await q.push([NewTask(f"t{i}".encode(), K(f"t{i}"), unique=True) for i in range(7)]) == 7
    leases = await q.reserve("w1", 7)
    assert await q.commit([Commit(leases[5])]) == 1  # acked: a repeat of its commit is fenced
    stale_attempt = Lease(leases[1].task_id, b"", leases[1].key, "w1", leases[1].attempt + 1, 0)
    other_worker = Lease(leases[3].task_id, b"", leases[3].key, "w2", leases[3].attempt, 0)
    fenced = [stale_attempt, other_worker, leases[5]]
    held = [leases[0], leases[2], leases[4], leases[6]]
    batch = [
        Commit(lease, done=[K(f"fenced-done-{i}")], undone=[K("pre-done")], children=[NewTask(b"fenced", K(f"f{i}"))])
        for i, lease in enumerate(fenced)
    ] + [
        Commit(lease, done=[K(f"done-{i}")], children=[NewTask(f"child-{i}".encode(), K(f"c{i}"), unique=True)])
        for i, lease in enumerate(held)
    ]
    batch = batch[::2] + batch[1::2]  # interleave fenced and held commits
    assert await q.commit(batch) == 4
    assert await q.stats() == QueueStats(ready=4, delayed=0, leased=2, dead=0)
    assert await d.count() == 1 + 4
    assert await d.contains([K("pre-done"), K("fenced-done-0"), K("fenced-done-1"), K("done-0"), K("done-3")]) == [
        True,
        False,
        False,
        True,
        True,
    ]
    _check_consistent(db, "mixed")
    assert sorted(await _payloads(q)) == [b"child-0", b"child-1", b"child-2", b"child-3"]
    assert await q.commit([Commit(leases[1]), Commit(leases[3])]) == 2, "the real holders still hold them"
    assert await q.push([NewTask(b"again", K(f"t{i}"), unique=True) for i in (0, 1, 3, 5)]) == 4
    _check_consistent(db, "mixed")


async def test_commit_same_task_twice_in_one_batch(db: Path, opened: list[Any]) -> None:
    q, d = await _queue(opened, "twice", db), await _done(opened, "twice", db)
    await q.push([NewTask(b"t", K("t"))])
    (lease,) = await q.reserve("w1", 1)
    forged = Lease(lease.task_id, lease.payload, lease.key, "w2", lease.attempt, lease.failures)
    batch = [Commit(forged, done=[K("x")]), Commit(lease, done=[K("y")]), Commit(lease, done=[K("z")])]
    assert await q.commit(batch) == 1, "the forged token is fenced, the repeat of the held one too"
    assert await d.contains([K("x"), K("y"), K("z")]) == [False, True, False]
    assert await q.stats() == QueueStats(0, 0, 0, 0)
    _check_consistent(db, "twice")


async def test_commit_batch_phases(db: Path, opened: list[Any]) -> None:
    """Acks, then done changes (last one wins), then children: unique ones see the first two phases."""
    q, d = await _queue(opened, "phases", db), await _done(opened, "phases", db)
    await d.add([K("was-done")])
    await q.push([NewTask(f"t{i}".encode(), K(f"t{i}"), unique=True) for i in range(5)])
    await q.push([NewTask(b"still-pending", K("pending"), unique=True)])
    a, b, c, e, f = await q.reserve("w1", 5)

    def u(name: str, key: str, **kw: Any) -> NewTask:
        return NewTask(name.encode(), K(key), unique=True, **kw)

    batch = [
        Commit(a, done=[K("k1"), K("k2")], children=[u("dup-1", "dup"), NewTask(b"plain-n", K("n")), u("t1", "t1")]),
        Commit(b, undone=[K("k1"), K("was-done")], children=[u("dup-2", "dup"), u("k2-child", "k2")]),
        Commit(c, done=[K("k1")], undone=[K("k2")], children=[u("n-unique", "n"), u("dup-3", "dup")]),
        Commit(e, undone=[K("k3")], done=[K("k3")], children=[u("k3-child", "k3"), u("was-done", "was-done")]),
        Commit(f, children=[u("pending", "pending"), u("t4", "t4"), NewTask(b"plain-dup", K("dup"))]),
    ]
    assert await q.commit(batch) == 5
    # done: k1 (done, undone, done), k3 (undone then done in one commit); k2 and was-done undone
    assert await d.contains([K("k1"), K("k2"), K("k3"), K("was-done")]) == [True, False, True, False]
    assert await d.count() == 2
    # t1 and t4 were acked first; k2 is not done any more (phase 2), k3 is; "dup" once unique plus a plain copy
    expected = [b"still-pending", b"dup-1", b"plain-n", b"t1", b"k2-child", b"was-done", b"t4", b"plain-dup"]
    assert await _payloads(q) == expected
    _check_consistent(db, "phases")


async def test_head_children_of_later_commits_go_first(db: Path, opened: list[Any]) -> None:
    q = await _queue(opened, "heads", db)
    await q.push([NewTask(b"p1"), NewTask(b"p2"), NewTask(b"old1"), NewTask(b"old2")])
    first, second = await q.reserve("w1", 2)
    batch = [
        Commit(first, children=[NewTask(b"a-head1", head=True), NewTask(b"a-tail"), NewTask(b"a-head2", head=True)]),
        Commit(second, children=[NewTask(b"b-late", delay=3600), NewTask(b"b-head", head=True), NewTask(b"b-tail")]),
    ]
    assert await q.commit(batch) == 2
    assert await q.stats() == QueueStats(ready=7, delayed=1, leased=0, dead=0)
    # as two pushes: the second batch's heads before the first's; tails in order
    expected = [b"b-head", b"a-head1", b"a-head2", b"old1", b"old2", b"a-tail", b"b-tail"]
    assert await _payloads(q) == expected
    # the same on an empty ready deque
    await q.push([NewTask(b"p3"), NewTask(b"p4")])
    first, second = await q.reserve("w1", 2)
    batch = [
        Commit(first, children=[NewTask(b"a-tail"), NewTask(b"a-head", head=True)]),
        Commit(second, children=[NewTask(b"b-head", head=True), NewTask(b"b-tail")]),
    ]
    assert await q.commit(batch) == 2
    assert await _payloads(q) == [b"b-head", b"a-head", b"a-tail", b"b-tail"]
    _check_consistent(db, "heads")


async def test_ack_pending_counts_of_repeated_keys(db: Path, opened: list[Any]) -> None:
    q = await _queue(opened, "copies", db)
    await q.push([NewTask(b"k", K("k")), NewTask(b"k", K("k")), NewTask(b"k", K("k")), NewTask(b"j", K("j"))])
    k1, k2, k3, j = await q.reserve("w1", 4)
    assert await q.commit([Commit(k1), Commit(j), Commit(k2)]) == 3
    _check_consistent(db, "copies")
    assert await q.push([NewTask(b"k2", K("k"), unique=True), NewTask(b"j2", K("j"), unique=True)]) == 1
    assert await q.commit([Commit(k3)]) == 1
    assert await q.push([NewTask(b"k3", K("k"), unique=True)]) == 1
    _check_consistent(db, "copies")
    leases = await q.reserve("w1", 10)
    assert await q.bury([(leases[0], "x"), (leases[1], "y")]) == 2  # both keys, each once
    assert await q.push([NewTask(b"j3", K("j"), unique=True), NewTask(b"k4", K("k"), unique=True)]) == 2
    _check_consistent(db, "copies")


async def test_batches_larger_than_a_chunk(db: Path, opened: list[Any]) -> None:
    chunk = sqlite_backend.CHUNK
    n = 2 * chunk + 44
    q, d = await _queue(opened, "big", db), await _done(opened, "big", db)
    tasks = [NewTask(f"t{i}".encode(), K(f"t{i % n}"), unique=True) for i in range(n + 50)]  # 50 repeats
    assert await q.push(tasks) == n
    assert await q.push(tasks) == 0
    leases = await q.reserve("w1", n + 10)
    assert len(leases) == n and (await q.stats()).leased == n
    assert await q.reserve("w2", 1) == []
    batch = [
        Commit(
            lease,
            done=[K(f"t{i}")],
            children=[
                NewTask(f"c{i}".encode(), K(f"c{i}"), unique=True),
                NewTask(b"again", K(f"t{(i + 1) % n}"), unique=True),  # done in phase 2: skipped
                NewTask(b"shared", K("shared"), unique=True),  # one copy for the whole batch
            ],
        )
        for i, lease in enumerate(leases)
    ]
    stale = [Commit(Lease(x.task_id, x.payload, x.key, "w2", x.attempt, 0), children=[NewTask(b"no")]) for x in leases]
    applied, statements = await _statements(q, q.commit(stale[:chunk] + batch + stale[chunk:]))
    assert applied == n
    assert len(statements) <= 40, statements  # a few per chunk of 128, not several per task
    assert await q.stats() == QueueStats(ready=n + 1, delayed=0, leased=0, dead=0)
    assert await d.count() == n
    _check_consistent(db, "big")
    expected = [b"c0", b"shared"] + [f"c{i}".encode() for i in range(1, n)]  # children in commit order
    assert await _payloads(q) == expected
    _check_consistent(db, "big")


async def test_statements_per_call_do_not_grow_with_the_batch(db: Path, opened: list[Any]) -> None:
    """Push, reserve and commit run the same few statements for 10 tasks as for 100."""
    counts = []
    for n in (10, 100):
        q = await _queue(opened, f"count-{n}", db)
        pushed, push_sql = await _statements(q, q.push([NewTask(b"t", K(f"{n}-{i}"), unique=True) for i in range(n)]))
        leases, reserve_sql = await _statements(q, q.reserve("w1", n))
        commits = [
            Commit(x, done=[K(f"d{i}")], children=[NewTask(b"c", K(f"c{i}"), unique=True)])
            for i, x in enumerate(leases)
        ]
        applied, commit_sql = await _statements(q, q.commit(commits))
        assert (pushed, len(leases), applied) == (n, n, n)
        counts.append((len(push_sql), len(reserve_sql), len(commit_sql)))
        _check_consistent(db, f"count-{n}")
    assert counts[0] == counts[1], counts
    push_n, reserve_n, commit_n = counts[0]
    assert push_n <= 5 and reserve_n <= 5 and commit_n <= 10, counts


# -- real processes ------------------------------------------------------------------


async def _start_consumers(db: Path, namespace: str, out_dir: Path, n: int, batch: int) -> list[Any]:
    """Start ``n`` consumer processes, wait until each has opened the file, then start them at once."""
    procs = []
    for i in range(n):
        procs.append(
            await asyncio.create_subprocess_exec(
                sys.executable,
                str(WORKER_SCRIPT),
                "consume",
                "sqlite",
                json.dumps({"path": str(db)}),
                namespace,
                str(out_dir / f"out-{i}.txt"),
                str(batch),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        )
    for p in procs:
        assert p.stdout is not None and p.stdin is not None
        line = await asyncio.wait_for(p.stdout.readline(), 30)
        if line.strip() != b"ready":
            _, err = await p.communicate()
            pytest.fail(f"worker did not start: {err.decode(errors='replace')}")
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(b"go\n")
        await p.stdin.drain()
    return procs


async def _finish(procs: list[Any]) -> None:
    for p in procs:
        _, err = await asyncio.wait_for(p.communicate(), 60)
        assert p.returncode == 0, err.decode(errors="replace")


@pytest.mark.processes
async def test_four_processes_deliver_each_task_exactly_once(db: Path, tmp_path: Path, opened: list[Any]) -> None:
    namespace = "multi-proc"
    q = await _queue(opened, namespace, db)
    payloads = {f"task-{i}" for i in range(4000)}
    assert await q.push([NewTask(p.encode(), key=K(p), unique=True) for p in sorted(payloads)]) == 4000
    procs = await _start_consumers(db, namespace, tmp_path, 4, batch=10)
    await _finish(procs)
    delivered = [line for i in range(4) for line in (tmp_path / f"out-{i}.txt").read_text().splitlines()]
    per_process = [len((tmp_path / f"out-{i}.txt").read_text().splitlines()) for i in range(4)]
    assert len(delivered) == len(set(delivered)), "a task was delivered twice"
    assert set(delivered) == payloads, "a task was lost"
    assert sum(1 for n in per_process if n > 0) >= 2, f"the processes did not run concurrently: {per_process}"
    assert await q.stats() == QueueStats(0, 0, 0, 0)
    _check_consistent(db, namespace)


async def _push_from_another_process(db: Path, namespace: str, count: int) -> None:
    """Another OS process pushes ``count`` tasks into ``namespace`` of ``db``."""
    pusher = await asyncio.create_subprocess_exec(
        sys.executable,
        str(WORKER_SCRIPT),
        "push",
        "sqlite",
        json.dumps({"path": str(db)}),
        namespace,
        str(count),
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(pusher.communicate(), 30)
    assert pusher.returncode == 0, err.decode(errors="replace")


@pytest.mark.processes
async def test_second_open_keeps_this_process_locks(db: Path, opened: list[Any]) -> None:
    """Opening another instance on an open file must not drop this process's POSIX locks.

    If it did, another process closing its connection would think it was the last
    one and delete the WAL index (-shm) under our open connections.
    """
    first = await _queue(opened, "first", db)
    await first.push([NewTask(b"x")])
    await _queue(opened, "second", db)  # same file, same process
    await _push_from_another_process(db, "first", 2)
    assert db.with_name(db.name + "-shm").exists(), "another process deleted the WAL index: our locks were lost"
    assert (await first.stats()).ready == 3
    _check_consistent(db, "first")


@pytest.mark.processes
async def test_idle_wait_sees_another_process_push(db: Path, opened: list[Any]) -> None:
    q = await _queue(opened, "notify", db)
    started = time.monotonic()
    await q.wait_for_tasks(0.1)
    assert 0.08 <= time.monotonic() - started < 5
    waiter = asyncio.ensure_future(q.wait_for_tasks(30))
    await _push_from_another_process(db, "notify", 3)
    await asyncio.wait_for(waiter, 5)
    assert (await q.stats()).ready == 3


async def test_idle_wait_returns_when_a_delayed_task_is_due(db: Path, opened: list[Any]) -> None:
    q = await _queue(opened, "due", db, poll_interval=10.0)
    await q.push([NewTask(b"later", delay=0.2)])
    started = time.monotonic()
    await asyncio.wait_for(q.wait_for_tasks(30), 5)
    assert time.monotonic() - started < 2
    assert [lease.payload for lease in await q.reserve("w", 1)] == [b"later"]


@pytest.mark.processes
async def test_event_loop_not_blocked_under_load(db: Path, tmp_path: Path, opened: list[Any]) -> None:
    """4 processes hammer the file while this loop reserves and commits; record the longest loop stall."""
    namespace = "lag"
    bulk = await _queue(opened, namespace, db)
    await bulk.push([NewTask(f"bulk-{i}".encode()) for i in range(6000)])
    q = await _queue(opened, "lag-own", db)  # same file, so the same write lock; own tasks
    procs = await _start_consumers(db, namespace, tmp_path, 4, batch=5)
    gaps: list[float] = []
    calls: list[float] = []
    stop = asyncio.Event()

    async def monitor() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            gaps.append(time.perf_counter() - t - 0.001)

    async def churn() -> None:
        i = 0
        while not stop.is_set():
            t = time.perf_counter()
            await q.push([NewTask(f"own-{i}-{j}".encode()) for j in range(5)])
            leases = await q.reserve("in-test", 5)
            await q.commit([Commit(lease) for lease in leases])
            calls.append(time.perf_counter() - t)
            i += 1

    tasks = [asyncio.ensure_future(monitor()), asyncio.ensure_future(churn())]
    try:
        await _finish(procs)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    worst = max(gaps)
    print(
        f"\nevent loop under load: {len(gaps)} wake-ups, max stall {worst * 1e3:.1f} ms, "
        f"p99 {sorted(gaps)[int(len(gaps) * 0.99)] * 1e3:.1f} ms; "
        f"push+reserve+commit: {len(calls)} rounds, max {max(calls) * 1e3:.1f} ms"
    )
    assert worst < 0.5, f"the event loop was blocked for {worst:.3f} s"
    assert await bulk.stats() == await q.stats() == QueueStats(0, 0, 0, 0)
    _check_consistent(db, namespace)
