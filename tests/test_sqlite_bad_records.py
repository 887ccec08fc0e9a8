"""Bad records in an SQLite file cost themselves only.

Anyone with access to the file (another program, a restore, a bug) can write rows this
backend would never write: SQLite columns take any type. Each test writes such rows with a
plain ``sqlite3`` connection, then calls the backend: no method raises because of them,
a bad ready task goes to the dead letters (never leased), a bad registry entry is skipped
with a warning, and everything else goes on as if they were not there.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from achihuo_mini import AsyncLoop
from achihuo_mini.backend import Commit, NewTask, QueueStats
from achihuo_mini.codec import encode_task, name_key
from achihuo_mini.errors import BackendError
from achihuo_mini.plugins import registry
from achihuo_mini_backends.sqlite import SqliteDoneSet, SqliteQueue

from .conftest import SpiderFactory
from .test_sqlite_backend import _check_consistent

K = name_key
NS = "bad-records"
LOGGER = "achihuo_mini.backends.sqlite"


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "loops.sqlite3"


@pytest.fixture
async def q(db: Path) -> AsyncIterator[SqliteQueue]:
    queue = SqliteQueue(NS, path=db)
    await queue.open()
    yield queue
    await queue.close()


@pytest.fixture
def raw(db: Path) -> Iterator[Any]:
    """``raw(sql, *params)``: run one statement on the file with a plain sqlite3 connection; ``raw.ns`` the id."""
    conn = sqlite3.connect(db, isolation_level=None)

    def run(sql: str, *params: Any) -> list[Any]:
        return conn.execute(sql.replace(":ns", str(run.ns)), params).fetchall()  # type: ignore[attr-defined]

    run.ns = 0  # type: ignore[attr-defined]
    yield run
    conn.close()


def _ns(raw: Any) -> int:
    raw.ns = raw("SELECT id FROM namespaces WHERE name = ?", NS.encode())[0][0]
    return int(raw.ns)


def _ready_row(raw: Any, payload: Any, key: Any = None, attempt: Any = 0, failures: Any = 0, pos: Any = 0) -> None:
    """A ready task as another program writes it, counters and pending count included."""
    raw("INSERT INTO tasks (ns, payload, key, pos, attempt, failures) VALUES (:ns, ?, ?, ?, ?, ?)",
        payload, key, pos, attempt, failures)  # fmt: skip
    raw("UPDATE namespaces SET ready = ready + 1 WHERE id = :ns")
    if key is not None:
        raw("INSERT INTO pending (ns, key, n) VALUES (:ns, ?, 1) ON CONFLICT (ns, key) DO UPDATE SET n = n + 1", key)


def _task(i: int) -> NewTask:
    return NewTask(f"good-{i}".encode(), K(f"good-{i}"), unique=True)


# -- ready tasks ------------------------------------------------------------------------

BAD_TASKS = {
    "payload INTEGER": ({"payload": 42}, "payload is INTEGER, not a BLOB"),
    "payload TEXT": ({"payload": "a text"}, "payload is TEXT, not a BLOB"),
    "payload REAL": ({"payload": 1.5}, "payload is REAL, not a BLOB"),
    "key too short": ({"payload": b"p", "key": b"short"}, "key is a BLOB of 5 bytes, not a 16-byte BLOB"),
    "key TEXT": ({"payload": b"p", "key": "0123456789abcdef"}, "key is TEXT, not a 16-byte BLOB"),
    "key INTEGER": ({"payload": b"p", "key": 7}, "key is INTEGER"),
    "attempt TEXT": ({"payload": b"p", "attempt": "x"}, "attempt number is TEXT 'x', not an integer"),
    "attempt REAL": ({"payload": b"p", "attempt": 1.5}, "attempt number is REAL 1.5"),
    "attempt negative": ({"payload": b"p", "attempt": -3}, "attempt number is INTEGER -3"),
    "failures BLOB": ({"payload": b"p", "failures": b"\x00"}, "failure count is a BLOB of 1 bytes"),
}


@pytest.mark.parametrize("bad", list(BAD_TASKS))
async def test_a_bad_ready_task_is_buried_with_its_reason_not_leased(
    bad: str, q: SqliteQueue, raw: Any, db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fields, reason = BAD_TASKS[bad]
    await q.push([_task(0)])
    _ns(raw)
    _ready_row(raw, pos=2, **fields)  # between two good tasks
    await q.push([_task(1)])
    with caplog.at_level(logging.WARNING, LOGGER):
        leases = await q.reserve("w", 10)
    assert [lease.payload for lease in leases] == [b"good-0", b"good-1"], "the bad task costs itself only"
    assert await q.stats() == QueueStats(ready=0, delayed=0, leased=2, dead=1)
    (letter,) = await q.dead_letters()
    assert reason in letter.error and letter.error.startswith("unreadable task")
    assert type(letter.payload) is bytes and letter.key is None
    assert reason in caplog.text
    assert await q.commit([Commit(lease) for lease in leases]) == 2
    assert await q.reserve("w", 10) == []
    _check_consistent(db, NS)


async def test_reserve_fills_its_limit_past_bad_tasks(q: SqliteQueue, raw: Any, db: Path) -> None:
    _ns(raw)
    for i in range(5):
        _ready_row(raw, payload=i, pos=i + 1)
    await q.push([_task(i) for i in range(3)])
    leases = await q.reserve("w", 3)
    assert [lease.payload for lease in leases] == [b"good-0", b"good-1", b"good-2"]
    assert (await q.stats()).dead == 5
    _check_consistent(db, NS)


async def test_a_text_position_does_not_break_pushes(q: SqliteQueue, raw: Any, db: Path) -> None:
    """A ``pos`` that is text sorts after every number: unbounded min/max would return it to every push."""
    _ns(raw)
    _ready_row(raw, payload=b"odd", pos="not a position")
    _ready_row(raw, payload=b"blob", pos=b"\x01")
    assert await q.push([NewTask(b"tail")]) == 1
    assert await q.push([NewTask(b"head", head=True)]) == 1
    leases = await q.reserve("w", 10)
    assert [lease.payload for lease in leases][:2] == [b"head", b"tail"]
    assert sorted(lease.payload for lease in leases[2:]) == [b"blob", b"odd"], "still valid tasks"
    _check_consistent(db, NS)


async def test_a_text_due_time_is_made_ready_by_recover(q: SqliteQueue, raw: Any, db: Path) -> None:
    ns = _ns(raw)
    raw("INSERT INTO tasks (ns, payload, due) VALUES (?, ?, ?)", ns, b"someday", "tomorrow")
    raw("UPDATE namespaces SET delayed = delayed + 1 WHERE id = :ns")
    await q.wait_for_tasks(0.05)  # does not raise on the text due time
    assert await q.reserve("w", 5) == []
    await q.recover()
    assert [lease.payload for lease in await q.reserve("w", 5)] == [b"someday"]
    _check_consistent(db, NS)


class Seeder(AsyncLoop):
    async def h(self, i: int) -> None:
        self.task_done(f"t{i}")


@pytest.fixture
def sqlite_spiders(db: Path, tmp_path: Path) -> Iterator[SpiderFactory]:
    factory = SpiderFactory("sqlite", {"path": db}, tmp_path)
    yield factory
    factory.cleanup()


async def test_a_bad_task_does_not_stall_a_real_loop(sqlite_spiders: SpiderFactory, db: Path) -> None:
    """An INTEGER payload used to be leased and never given back: idle-exit never came."""
    loop = sqlite_spiders(Seeder, concurrency=4)
    for i in range(20):
        loop.add_task("h", i, task_name=f"t{i}")
    q = SqliteQueue(loop.NAME, path=db)  # creates the file, as another program might have
    await q.open()
    try:
        with closing(sqlite3.connect(db, isolation_level=None)) as conn, conn:
            (ns,) = conn.execute("SELECT id FROM namespaces WHERE name = ?", (loop.NAME.encode(),)).fetchone()
            conn.execute("INSERT INTO tasks (ns, payload, pos) VALUES (?, 42, -1)", (ns,))
            conn.execute("UPDATE namespaces SET ready = ready + 1 WHERE id = ?", (ns,))
        summary = await asyncio.wait_for(loop.serve(idle_exit=0.2), 30)
        assert summary.exit_code == 0 and summary.succeeded == 20
        assert await q.stats() == QueueStats(ready=0, delayed=0, leased=0, dead=1)
        (letter,) = await q.dead_letters()
        assert "payload is INTEGER" in letter.error
    finally:
        await q.close()


# -- the worker registry ----------------------------------------------------------------


def _worker_row(raw: Any, worker: Any, alias: Any, info: Any = "{}", last_seen: Any = None, ttl: Any = 30.0) -> None:
    raw("INSERT INTO workers (ns, worker, alias, role, info, last_seen, ttl) VALUES (:ns, ?, ?, 'slave', ?, ?, ?)",
        worker, alias, info, time.time() if last_seen is None else last_seen, ttl)  # fmt: skip


BAD_ENTRIES: dict[str, dict[str, Any]] = {
    "info not JSON": {"info": "{not json"},
    "info a JSON list": {"info": "[1, 2]"},
    "info a BLOB": {"info": b"\x00\xff"},
    "info not UTF-8": {"info": "x'ff'"},  # written as CAST(x'ff' AS TEXT) below
    "alias a BLOB": {"alias": b"s9"},
    "last_seen text": {"last_seen": "yesterday"},
    "worker a BLOB": {"worker": b"\xfe\xed"},
}


def _bad_entry(raw: Any, bad: str, alias: str = "s7") -> None:
    row: dict[str, Any] = {"worker": "bad-worker", "alias": alias, **BAD_ENTRIES[bad]}
    if bad == "info not UTF-8":
        sql = "INSERT INTO workers VALUES (:ns, ?, ?, 'slave', CAST(x'ff' AS TEXT), ?, 30)"
        raw(sql, row["worker"], row["alias"], time.time())
    else:
        _worker_row(raw, **row)


@pytest.mark.parametrize("bad", list(BAD_ENTRIES))
async def test_a_bad_registry_entry_is_skipped_with_a_warning(
    bad: str, q: SqliteQueue, raw: Any, caplog: pytest.LogCaptureFixture
) -> None:
    assert await q.register("good-master", "master", {"pid": 1}, 30) == "m1"
    assert await q.register("good-slave", "slave", {"pid": 2}, 30) == "s1"
    _ns(raw)
    _bad_entry(raw, bad)
    with caplog.at_level(logging.WARNING, LOGGER):
        workers = await q.workers()
    assert [(w.worker, w.alias) for w in workers] == [("good-master", "m1"), ("good-slave", "s1")]
    assert "skipped registry entry" in caplog.text
    assert await q.register("next-slave", "slave", {}, 30) == "s2"
    reachable = bad not in ("alias a BLOB", "worker a BLOB")  # a mailbox needs a worker id and the alias
    assert await q.send(["m1", "s1", "s7"], "stop") == ["m1", "s1"] + (["s7"] if reachable else [])
    assert await q.heartbeat("good-slave", {}, 30) == ["stop"]


async def test_an_alias_that_is_not_one_is_listed_last_and_ignored_by_register(q: SqliteQueue, raw: Any) -> None:
    """'²'.isdigit() is True but int('²') fails: sorting and claiming aliases must not trip on it."""
    _ns(raw)
    _worker_row(raw, "odd-1", "s²")
    _worker_row(raw, "odd-2", "m01")
    _worker_row(raw, "odd-3", "sx")
    assert await q.register("w1", "slave", {}, 30) == "s1"
    assert await q.register("w2", "master", {}, 30) == "m1"
    assert [w.alias for w in await q.workers()] == ["m1", "s1", "m01", "sx", "s²"]
    assert await q.send(["s²"], "stop") == ["s²"], "a worker with a damaged alias can still be stopped"


async def test_recover_skips_bad_entries_and_recovers_real_dead_workers(
    q: SqliteQueue, raw: Any, db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await q.push([_task(i) for i in range(3)])
    await q.register("dead", "slave", {}, 30)
    held = await q.reserve("dead", 2)
    await q.register("alive", "master", {}, 30)
    _ns(raw)
    raw("UPDATE workers SET last_seen = ? WHERE worker = 'dead'", time.time() - 100)
    _bad_entry(raw, "info not JSON", alias="s8")  # alive by its clock: kept (its heartbeat rewrites the info)
    _bad_entry(raw, "worker a BLOB", alias="s9")  # no worker of ours has this id: recovered
    _worker_row(raw, "no-clock", "s20", last_seen="never", ttl="x")  # liveness unreadable: recovered...
    raw("UPDATE tasks SET worker = 'no-clock' WHERE id = ?", held[1].task_id)  # ...with its lease
    with caplog.at_level(logging.WARNING, LOGGER):
        assert await q.recover() == 2
    assert "cannot be read" in caplog.text
    assert sorted(row[0] for row in raw("SELECT worker FROM workers")) == ["alive", "bad-worker"]
    assert [w.worker for w in await q.workers()] == ["alive"]
    assert await q.heartbeat("alive", {}, 30) == []
    assert [lease.payload for lease in await q.reserve("alive", 5)] == [b"good-0", b"good-1", b"good-2"]
    _check_consistent(db, NS)


async def test_a_command_that_is_not_text_is_dropped(q: SqliteQueue, raw: Any) -> None:
    await q.register("w", "slave", {}, 30)
    await q.send(["s1"], "first")
    _ns(raw)
    raw("INSERT INTO mailbox (ns, worker, command) VALUES (:ns, 'w', ?)", b"\x00binary")
    raw("INSERT INTO mailbox (ns, worker, command) VALUES (:ns, 'w', CAST(x'ff' AS TEXT))")
    await q.send(["s1"], "stop")
    assert await q.heartbeat("w", {}, 30) == ["first", "stop"]
    assert await q.heartbeat("w", {}, 30) == []


async def test_leases_leave_out_a_damaged_lease(q: SqliteQueue, raw: Any) -> None:
    await q.push([_task(i) for i in range(3)])
    held = await q.reserve("w", 3)
    _ns(raw)
    raw("UPDATE tasks SET attempt = 'x' WHERE id = ?", held[1].task_id)
    assert [lease.task_id for lease in await q.leases("w")] == [held[0].task_id, held[2].task_id]


# -- counters, dead letters, loop listing ----------------------------------------------


async def test_damaged_counters_are_counted_from_the_rows(q: SqliteQueue, raw: Any, db: Path) -> None:
    await q.push([_task(i) for i in range(3)])
    d = SqliteDoneSet(NS, path=db)
    await d.open()
    try:
        await d.add([K("a"), K("b")])
        _ns(raw)
        raw("UPDATE namespaces SET ready = 'many', done = x'00' WHERE id = :ns")
        assert await q.stats() == QueueStats(ready=3, delayed=0, leased=0, dead=0)
        assert await d.count() == 2
    finally:
        await d.close()


async def test_damaged_dead_letters_are_listed_and_stay_on_requeue(
    q: SqliteQueue, raw: Any, db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await q.push([_task(0), _task(1)])
    first, second = await q.reserve("w", 2)
    await q.bury([(first, "boom 0")])
    ns = _ns(raw)
    raw("INSERT INTO dead (ns, task_id, payload, key, error, failures) VALUES (?, 'x', 42, 'k', x'ff', 'many')", ns)
    raw("INSERT INTO dead (ns, task_id, payload, key, error, failures) VALUES (?, 9, ?, ?, 'wrong key', 1)",
        ns, b"payload", b"short")  # fmt: skip
    raw("UPDATE namespaces SET dead = dead + 2 WHERE id = :ns")
    await q.bury([(second, "boom 1")])
    with caplog.at_level(logging.WARNING, LOGGER):
        letters = await q.dead_letters()
    assert [letter.error.splitlines()[-1] for letter in letters] == [
        "boom 0",
        "(damaged dead letter: task id is TEXT; payload is INTEGER; key is TEXT; error text is a BLOB of 1 bytes; "
        "failure count is TEXT)",
        "(damaged dead letter: key is a BLOB of 5 bytes)",
        "boom 1",
    ]
    assert letters[1].payload == b"42" and letters[1].key is None and letters[1].failures == 0
    assert "damaged" in caplog.text
    assert await q.requeue_dead(2) == 2, "the damaged ones are passed over, not counted"
    assert [lease.payload for lease in await q.reserve("w", 5)] == [b"good-0", b"good-1"]
    assert (await q.stats()).dead == 2
    assert await q.requeue_dead() == 0
    assert len(await q.dead_letters()) == 2
    _check_consistent(db, NS)


async def test_listing_loops_skips_a_name_that_is_not_a_name(q: SqliteQueue, raw: Any, db: Path) -> None:
    await q.push([NewTask(b"x")])
    raw("INSERT INTO namespaces (name, ready) VALUES ('text name', 1), (x'ff', 1), (7, 1)")
    spec = registry.get("sqlite")
    assert spec.list_loops is not None
    assert await spec.list_loops({"path": db}) == [NS]


async def test_no_raw_error_leaves_a_method(q: SqliteQueue) -> None:
    """Whatever a body raises while reading rows reaches the caller as a BackendError, the original chained."""
    for error in (ValueError("bad"), TypeError("bad"), UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"), KeyError(1)):

        def body(c: sqlite3.Connection, error: Exception = error) -> None:
            raise error

        with pytest.raises(BackendError, match="unreadable data") as info:
            await q._call(body, mode="read")
        assert info.value.__cause__ is error
    assert await q.push([NewTask(encode_task("h", "n", []))]) == 1, "the backend still works"
