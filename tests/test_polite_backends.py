"""Backend details of expiring done names and per-host slots beyond the contract suite:
the SQLite schema upgrade, bad data in Redis and SQLite, the Redis key layout, spill files."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis.asyncio

from achihuo_mini._outbox import Outbox
from achihuo_mini._spill import _outbox, spill, spill_path
from achihuo_mini.backend import HostAsk
from achihuo_mini.backend import name_key as K
from achihuo_mini_backends.redis_backend import redis_key
from achihuo_mini_backends.redis_backend.keys import HOST_PART
from achihuo_mini_backends.sqlite import SCHEMA_VERSION, SqliteDoneSet, SqliteQueue
from achihuo_mini_backends.sqlite.connection import APPLICATION_ID, SCHEMA

from .test_redis_backend import bucket_key, names, open_done, open_queue, opened, plain  # noqa: F401
from .test_redis_bad_data import LOGGER, warnings  # noqa: F401

# -- SQLite -------------------------------------------------------------------------------


def _version_1(path: Path) -> None:
    """A file as version 1 wrote it: the done table without ``expires``, no host tables, no counters."""
    with closing(sqlite3.connect(path)) as c, c:
        for statement in SCHEMA:
            if "host_" in statement or "done_expiring" in statement or "counters" in statement:
                continue
            c.execute(statement.replace("    expires REAL,\n", ""))
        c.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        c.execute("PRAGMA user_version = 1")
        c.execute("INSERT INTO namespaces (name, done) VALUES (?, 1)", (b"old-loop",))
        c.execute("INSERT INTO done (ns, key) VALUES (1, ?)", (K("crawled-by-v1"),))
    c.close()


async def test_a_version_1_file_is_upgraded_in_place(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "v1.sqlite3"
    _version_1(path)
    with closing(sqlite3.connect(path)) as c, c:
        assert "expires" not in [row[1] for row in c.execute("PRAGMA table_info(done)")]
    done = SqliteDoneSet("old-loop", path=path)
    queue = SqliteQueue("old-loop", path=path)
    with caplog.at_level(logging.INFO):
        await done.open()
        await queue.open()
    try:
        assert "upgraded the schema from version 1 to 2" in caplog.text
        assert await done.contains([K("crawled-by-v1")]) == [True], "names of version 1 stay done, for ever"
        assert await done.add_expiring([(K("new"), 60.0)]) == 1
        (g,) = await queue.claim_hosts("w", [HostAsk("h", slots=1, limit=1)], 5, 1)
        assert g.slots == 1
        assert await done.count() == 2
    finally:
        await done.close()
        await queue.close()
    with closing(sqlite3.connect(path)) as c, c:
        assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2


async def test_sqlite_bad_ttl_and_slot_rows_cost_themselves_only(tmp_path: Path) -> None:
    path = tmp_path / "bad.sqlite3"
    done = SqliteDoneSet("loop", path=path)
    queue = SqliteQueue("loop", path=path)
    await done.open()
    await queue.open()
    try:
        await done.add_expiring([(K("text-ttl"), 60.0), (K("blob-ttl"), 60.0)])
        await queue.claim_hosts("other", [HostAsk("h", slots=2, limit=3, turns=1, delay=1.0)], 60, 1)
        with closing(sqlite3.connect(path)) as c, c:
            c.execute("UPDATE done SET expires = 'soon' WHERE key = ?", (K("text-ttl"),))
            c.execute("UPDATE done SET expires = x'00' WHERE key = ?", (K("blob-ttl"),))
            c.execute("UPDATE host_slots SET n = 'many', waiting = 'x'")
            c.execute("UPDATE host_turns SET next_start = ?", (time.time() + 10**9,))
        assert await done.contains([K("text-ttl"), K("blob-ttl")]) == [True, True], "kept: done, never lost"
        (g,) = await queue.claim_hosts("me", [HostAsk("h", slots=3, limit=3, turns=1, delay=1.0)], 60, 1)
        assert g.slots == 3, "a holding that is not a count counts for nothing"
        assert g.start < 1.0, "a next start a day ahead or more is garbage, not a wait of 30 years"
    finally:
        await done.close()
        await queue.close()


# -- Redis --------------------------------------------------------------------------------


async def test_redis_expiring_names_layout_and_bad_values(
    names: Callable[[str], str],  # noqa: F811
    open_done: Any,  # noqa: F811
    plain: redis.asyncio.Redis,  # noqa: F811
    warnings: Callable[[], list[str]],  # noqa: F811
) -> None:
    ns = names("ttl")
    done = await open_done(ns)
    await done.add([K("forever")])
    before = time.time()
    await done.add_expiring([(K("weekly"), 7 * 86400.0)])
    assert await plain.hget(bucket_key(ns, K("forever")), K("forever")[2:]) == b"", "no ttl: costs what it cost"
    raw = await plain.hget(bucket_key(ns, K("weekly")), K("weekly")[2:])
    assert raw is not None and before + 7 * 86400 <= int(raw) <= time.time() + 7 * 86400 + 1, raw
    await plain.hset(bucket_key(ns, K("weekly")), K("weekly")[2:], b"\xffnot a second")
    assert await done.contains([K("weekly")]) == [True], "unreadable: done for ever (nothing lost)"
    assert any("not a ttl" in w for w in warnings())
    assert await done.add([K("weekly")]) == 0
    assert await plain.hget(bucket_key(ns, K("weekly")), K("weekly")[2:]) == b"", "a write repairs it"
    assert await done.count() == 2


async def test_redis_host_keys(
    names: Callable[[str], str],  # noqa: F811
    open_queue: Any,  # noqa: F811
    plain: redis.asyncio.Redis,  # noqa: F811
    warnings: Callable[[], list[str]],  # noqa: F811
) -> None:
    ns = names("hosts")
    q = await open_queue(ns)
    key = redis_key(ns, HOST_PART + "example.com")
    assert key.startswith(f"achihuo:{{{ns}}}:h:".encode()), "under the loop's hash tag"
    before = q.round_trips
    (g, h) = await q.claim_hosts(
        "w1", [HostAsk("example.com", slots=2, limit=4, turns=3, delay=0.5), HostAsk("b.org", turns=1, delay=1)], 5, 1
    )
    assert q.round_trips - before == 1, "one script call for every host of a call"
    assert (g.slots, g.held, g.turns, h.turns) == (2, 2, 3, 1)
    assert 0 < await plain.pttl(key) <= 6000, "the key expires by itself"
    await plain.hset(key, mapping={"w:ghost": "garbage", "next": "x" * 40, "junk": "1"})
    (g,) = await q.claim_hosts("w2", [HostAsk("example.com", slots=4, limit=4)], 5, 1)
    assert g.slots == 2 and g.workers == 2, "garbage holds nothing; w1's 2 slots count"
    assert sorted(await plain.hkeys(key)) == [b"w:w1", b"w:w2"], "unreadable fields are dropped"
    assert any("unreadable" in w for w in warnings())
    await plain.delete(key)
    await plain.set(key, "a string")
    (g,) = await q.claim_hosts("w1", [HostAsk("example.com", slots=1, limit=1)], 5, 1)
    assert g.slots == 1 and any("held a string" in w for w in warnings())
    (g,) = await q.claim_hosts("w1", [HostAsk("example.com", release=1)], 5, 1)
    assert g.held == 0 and not await plain.exists(key), "nothing held: no key left"
    await plain.delete(redis_key(ns, HOST_PART + "b.org"))


# -- spill files --------------------------------------------------------------------------


def _records(path: Path) -> list[Any]:
    with path.open("rb") as f:
        return list(msgpack.Unpacker(f, raw=False))


def test_a_ttl_survives_the_spill_file() -> None:
    box = Outbox()
    box.mark(K("a"), "a", True, 30.0)
    box.mark(K("b"), "b", True)
    box.mark(K("c"), "c", False)
    path = spill("spill-ttl-test", box)
    try:
        (record,) = _records(path)
        back = _outbox(record)
        assert back.ttls == {K("a"): 30.0} and back.split_done() == ([K("b")], [K("c")])
        record[2][0][3] = -1.0
        with pytest.raises(ValueError, match="ttl"):
            _outbox(record)
    finally:
        spill_path("spill-ttl-test").unlink()
