"""Bad data in a loop's Redis keys costs the bad entry only.

Anyone with access to the server (a bug, a partial restore, a hand edit) can write
anything into a loop's keys. Each test writes such data with a raw client, then calls
the backend — and where it matters the loop and the command line — and checks that
the good entries are untouched, the bad one is quarantined (a dead letter), skipped
or repaired, and a warning says so.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis.asyncio

from achihuo_mini import AsyncLoop
from achihuo_mini.backend import Commit, NewTask, QueueStats
from achihuo_mini.backend import name_key as K
from achihuo_mini.cli import run_spider_cli
from achihuo_mini.errors import BackendError
from achihuo_mini.testing import wait_until
from achihuo_mini_backends.redis_backend import KEY_PARTS, RedisDoneSet, RedisQueue, connection, redis_key
from achihuo_mini_backends.redis_backend.queue import _leases

from . import test_redis_backend as base
from .conftest import SpiderFactory

names, opened, open_queue, open_done, plain = base.names, base.opened, base.open_queue, base.open_done, base.plain

LOGGER = "achihuo_mini.backends.redis"


@pytest.fixture
def warnings(caplog: pytest.LogCaptureFixture) -> Callable[[], list[str]]:
    """``warnings()``: the backend's warnings so far."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    return lambda: [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def _task(name: str) -> NewTask:
    return NewTask(f"payload-{name}".encode(), K(name), unique=True)


async def _ids(plain: redis.asyncio.Redis, ns: str) -> list[bytes]:
    return list(await plain.lrange(redis_key(ns, "ready"), 0, -1))


# -- 1. every script validates before its first write ----------------------------------


async def test_a_corrupt_meta_costs_its_own_task_only(
    names: Callable[[str], str], open_queue: Any, plain: redis.asyncio.Redis, warnings: Any
) -> None:
    """Was: reserve popped all six ready ids, then failed on the bad one: five tasks vanished."""
    ns = names("meta")
    q: RedisQueue = await open_queue(ns)
    good = [f"t{i}" for i in range(6)]
    assert await q.push([_task(n) for n in good]) == 6
    bad_id = (await _ids(plain, ns))[2]
    await plain.hset(redis_key(ns, "meta"), bad_id, b"garbage")
    leases = await q.reserve("w", 10)
    assert [lease.payload for lease in leases] == [f"payload-{n}".encode() for n in good if n != "t2"]
    assert await q.stats() == QueueStats(ready=0, delayed=0, leased=5, dead=1)
    (letter,) = await q.dead_letters()
    assert letter.task_id == int(bad_id) and letter.payload == b"payload-t2" and "metadata" in letter.error
    assert any("metadata" in w and "dead letters" in w for w in warnings())
    assert await q.commit([Commit(lease) for lease in leases]) == 5
    assert await q.push([_task(n) for n in good if n != "t2"]) == 5, "their pending counts dropped"


async def test_every_kind_of_bad_ready_entry_is_quarantined(
    names: Callable[[str], str], open_queue: Any, plain: redis.asyncio.Redis
) -> None:
    ns = names("ready")
    q: RedisQueue = await open_queue(ns)
    await q.push([_task("a"), _task("b"), _task("c")])
    a, b, _ = await _ids(plain, ns)
    ready = redis_key(ns, "ready")
    await plain.hdel(redis_key(ns, "tasks"), b)  # meta without payload
    await plain.rpush(ready, b"not-an-id", a, b"00042", b"99999999999999999999")  # garbage, a duplicate, ...
    (first,) = await q.reserve("w", 1)
    assert first.payload == b"payload-a"
    leases = await q.reserve("w", 10)
    assert [lease.payload for lease in leases] == [b"payload-c"], "each bad entry cost itself only"
    letters = await q.dead_letters()
    reasons = sorted(letter.error for letter in letters)
    assert len(letters) == 4 and all("quarantined" in r for r in reasons), reasons
    assert sum("not a task id" in r for r in reasons) == 3 and sum("missing" in r for r in reasons) == 1
    assert await q.stats() == QueueStats(ready=0, delayed=0, leased=2, dead=4)
    assert await q.push([_task("b")]) == 1, "the name of a quarantined task is not pending any more"


async def test_requeue_skips_a_corrupt_dead_letter(
    names: Callable[[str], str], open_queue: Any, plain: redis.asyncio.Redis, warnings: Any
) -> None:
    """Was: one corrupt dead letter among four made requeue pop all four, then fail: four tasks lost."""
    ns = names("requeue")
    q: RedisQueue = await open_queue(ns)
    await q.push([_task(f"d{i}") for i in range(4)])
    leases = await q.reserve("w", 4)
    assert await q.bury([(lease, "boom") for lease in leases]) == 4
    dead = redis_key(ns, "dead")
    await plain.lset(dead, 1, b"\xc1 not msgpack")
    assert len(await q.dead_letters()) == 3, "listing skips it"
    assert any("unreadable: skipped" in w for w in warnings())
    assert await q.requeue_dead() == 3
    assert await plain.lrange(dead, 0, -1) == [b"\xc1 not msgpack"], "left at the end for clear dead"
    again = await q.reserve("w", 10)
    assert sorted(lease.payload for lease in again) == [b"payload-d0", b"payload-d2", b"payload-d3"]
    await plain.rpush(dead, msgpack.packb([1, 2, b"short key", b"e", b"p"], use_bin_type=False))
    assert await q.requeue_dead(5) == 0 and await q.stats() == QueueStats(0, 0, 3, 2)


async def test_a_bad_pending_count_blocks_nothing_and_is_rewritten(
    names: Callable[[str], str], open_queue: Any, plain: redis.asyncio.Redis, warnings: Any
) -> None:
    """Was: HINCRBY failed mid-commit after earlier children were written; each retry pushed them again."""
    ns = names("pending")
    q: RedisQueue = await open_queue(ns)
    pending = redis_key(ns, "pending")
    await q.push([_task("parent")])
    (lease,) = await q.reserve("w", 1)
    await plain.hset(pending, K("child-2"), b"not a count")
    await plain.hset(pending, K("parent"), b"-3")
    children = [_task("child-1"), _task("child-2"), _task("parent")]
    assert await q.commit([Commit(lease, children=children)]) == 1
    assert await q.commit([Commit(lease, children=children)]) == 0, "a repeated commit is fenced"
    assert await q.stats() == QueueStats(ready=3, delayed=0, leased=0, dead=0), "each child once"
    assert await plain.hget(pending, K("child-2")) == b"1" and await plain.hget(pending, K("parent")) == b"1"
    assert any("not a count" in w for w in warnings())
    await plain.hset(pending, K("x"), b"99999999999999999999999")  # beyond HINCRBY's range
    assert await q.push([_task("x")]) == 1 and await plain.hget(pending, K("x")) == b"1"


async def test_retry_and_bury_rebuild_a_corrupt_meta_from_the_lease(
    names: Callable[[str], str], open_queue: Any, plain: redis.asyncio.Redis
) -> None:
    ns = names("retry")
    q: RedisQueue = await open_queue(ns)
    await q.push([_task("r"), _task("b")])
    r, b = await q.reserve("w", 2)
    await plain.hset(redis_key(ns, "meta"), str(r.task_id), b"x")
    await plain.hset(redis_key(ns, "meta"), str(b.task_id), b"")
    assert await q.retry([(r, 0)]) == 1
    assert await q.bury([(b, "gave up")]) == 1
    (again,) = await q.reserve("w", 1)
    assert (again.payload, again.key, again.attempt, again.failures) == (b"payload-r", K("r"), 2, 1)
    (letter,) = await q.dead_letters()
    assert (letter.payload, letter.key, letter.failures, letter.error) == (b"payload-b", K("b"), 1, "gave up")
    assert await q.push([_task("b")]) == 1, "b's pending count dropped with the lease's key"


async def test_bad_counters_and_wrong_key_types(
    names: Callable[[str], str], open_queue: Any, open_done: Any, plain: redis.asyncio.Redis, warnings: Any
) -> None:
    ns = names("counters")
    q: RedisQueue = await open_queue(ns)
    d: RedisDoneSet = await open_done(ns)
    await plain.set(redis_key(ns, "seq"), b"12abc")
    assert await q.push([_task("a")]) == 1
    assert any("id counter" in w for w in warnings())
    assert await d.add([K("x"), K("y")]) == 2
    await plain.set(redis_key(ns, "dcount"), b"lots")
    assert await d.add([K("z")]) == 1, "a garbage counter does not stop the done set"
    assert await d.count() == 3, "count() recounts the buckets"
    assert await plain.get(redis_key(ns, "dcount")) == b"3", "and repairs the counter"
    # Keys of the wrong type whose content can be rebuilt or given up safely are repaired.
    await q.register("w-1", "slave", {}, 30)
    for part in ("pending", "wake", "dcount", "winfo", "aliases"):
        await plain.delete(redis_key(ns, part))
        if part == "dcount":
            await plain.rpush(redis_key(ns, part), b"a list")
        else:
            await plain.set(redis_key(ns, part), b"a string")
    bucket = base.bucket_key(ns, K("w"))
    await plain.set(bucket, b"not a hash")
    assert await q.push([_task("a"), _task("w")]) == 2, "pending counts lost count as 0: a duplicate, not a loss"
    assert await d.add([K("w")]) == 1 and await d.count() == 4
    assert [(w.alias, w.info) for w in await q.workers()] == [("s1", {})]
    assert await q.send(["s1"], "stop") == ["s1"], "the aliases were rebuilt from the worker records"
    assert sum("repaired" in w for w in warnings()) == 5 and any("bucket" in w for w in warnings())
    await plain.delete(redis_key(ns, "workers"))
    await plain.set(redis_key(ns, "workers"), b"s")
    assert await q.heartbeat("w-1", {}, 30) is None, "the workers register again"
    # A key of the wrong type that holds tasks: the script fails before writing anything.
    await plain.delete(redis_key(ns, "ready"))
    await plain.set(redis_key(ns, "ready"), b"a string")
    before = await plain.hgetall(redis_key(ns, "tasks")), await plain.hgetall(redis_key(ns, "pending"))
    with pytest.raises(BackendError, match="not a list"):
        await q.push([_task("b")])
    after = await plain.hgetall(redis_key(ns, "tasks")), await plain.hgetall(redis_key(ns, "pending"))
    assert before == after, "nothing was written"


# -- 2. registry entries: workers, CLI and recovery go on -----------------------------


async def _now_ms(plain: redis.asyncio.Redis) -> int:
    seconds, micros = await plain.time()
    return int(seconds) * 1000 + int(micros) // 1000


def _record(alias: str, role: str, ttl_ms: int, seen_ms: int) -> bytes:
    return bytes(msgpack.packb([alias, role, ttl_ms, seen_ms], use_bin_type=False))


async def _garbage(kind: str, plain: redis.asyncio.Redis, ns: str) -> None:
    """Write one kind of bad registry data into loop ``ns``."""
    key = lambda part: redis_key(ns, part)  # noqa: E731
    now = await _now_ms(plain)
    if kind == "delayed member":
        await plain.zadd(key("delayed"), {b"not-an-id": 0})
    elif kind == "worker record":
        await plain.hset(key("workers"), b"w-garbage", b"\xc1\x00 garbage")
        await plain.hset(key("aliases"), b"s1", b"w-garbage")
    elif kind == "lease token":
        await plain.hset(key("leased"), b"1000", b"no colon here")
    elif kind == "alias":
        await plain.hset(key("workers"), b"w-sq", _record("s\u00b2", "slave", 600_000, now))
        await plain.hset(key("aliases"), "s\u00b2".encode(), b"w-sq")
    elif kind.startswith("winfo"):
        info = {"winfo text": b"not json {", "winfo list": b"[1, 2]", "winfo deep": b"[" * 100_000}[kind]
        await plain.hset(key("workers"), b"w-info", _record("s7", "slave", 600_000, now))
        await plain.hset(key("aliases"), b"s7", b"w-info")
        await plain.hset(key("winfo"), b"w-info", info)
    elif kind == "mailbox":
        await plain.hset(key("workers"), b"w-box", _record("s8", "slave", 600_000, now))
        await plain.hset(key("aliases"), b"s8", b"w-box")
        await plain.hset(key("mailbox"), b"w-box", b"\x92\xa4stop\x05")  # a command and a number
    else:
        raise AssertionError(kind)


class _Few(AsyncLoop):
    async def run(self) -> None:
        for i in range(5):
            self.add_task("work", i, task_name=f"t{i}", repeat=False)

    async def work(self, i: int) -> None:
        self.task_done(f"t{i}")


@pytest.fixture
def redis_spiders(redis_url: str, tmp_path: Path) -> Iterator[SpiderFactory]:
    factory = SpiderFactory("redis", {"url": redis_url}, tmp_path)
    yield factory
    factory.cleanup()


@pytest.fixture
async def wipe(plain: redis.asyncio.Redis) -> AsyncIterator[Callable[[str], None]]:
    """``wipe(NAME)``: every fixed key of that loop is deleted after the test (garbage included)."""
    loops: list[str] = []
    yield loops.append
    for ns in loops:
        await plain.delete(*(redis_key(ns, part) for part in KEY_PARTS))


def _cli(cls: type, config: Path, *argv: str) -> int:
    return run_spider_cli(cls(config_file=config, debug=False), list(argv))


GARBAGE = ["delayed member", "worker record", "lease token", "alias", "winfo text", "winfo list", "winfo deep",
           "mailbox"]  # fmt: skip


@pytest.mark.parametrize("kind", GARBAGE)
async def test_bad_registry_data_stops_no_worker_and_no_command(
    kind: str,
    redis_spiders: SpiderFactory,
    plain: redis.asyncio.Redis,
    wipe: Callable[[str], None],
    capsys: pytest.CaptureFixture[str],
    warnings: Any,
) -> None:
    """Was: every worker exited 1 at start, and ``status``, ``stop`` and ``dead`` failed."""
    cls = redis_spiders.subclass(_Few)
    wipe(cls.NAME)
    await _garbage(kind, plain, cls.NAME)
    loop = cls(config_file=redis_spiders.config, debug=False, progress_interval=0)
    summary = await loop.serve(idle_exit=0)
    assert (summary.exit_code, summary.succeeded) == (0, 5), summary.reason
    capsys.readouterr()
    assert await asyncio.to_thread(_cli, cls, redis_spiders.config, "status", "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert status["done"]["count"] == 5
    assert await asyncio.to_thread(_cli, cls, redis_spiders.config, "dead") == 0
    assert await asyncio.to_thread(_cli, cls, redis_spiders.config, "stop", "all", "--timeout", "0.2") in (0, 1)
    out = capsys.readouterr()
    assert "error:" not in out.err and "Traceback" not in out.err, out.err
    assert warnings() or kind == "alias", "the repair is logged (an odd alias needs none: it sorts last)"


async def test_registry_readers_skip_or_repair_bad_entries(
    names: Callable[[str], str], open_queue: Any, plain: redis.asyncio.Redis, warnings: Any
) -> None:
    ns = names("registry")
    q: RedisQueue = await open_queue(ns)
    for kind in ("worker record", "alias", "winfo deep", "mailbox"):
        await _garbage(kind, plain, ns)
    await plain.hset(redis_key(ns, "workers"), "w-\udcff".encode("utf-8", "surrogateescape"), _record("s9", "x", 1, 1))
    assert await q.register("w-1", "slave", {"x": 1}, 30) == "s1", "an unreadable record holds no alias"
    listed = await q.workers()
    expected = [("s1", "w-1"), ("s7", "w-info"), ("s8", "w-box"), ("s\u00b2", "w-sq")]
    assert [(w.alias, w.worker) for w in listed] == expected
    assert listed[1].info == {}, "info that is not a JSON object is listed as empty"
    assert await q.send(["s8", "s\u00b2", "s1", "s5"], "stop") == ["s8", "s\u00b2", "s1"]
    assert await q.heartbeat("w-box", {}, 30) == ["stop", "stop"], "the readable commands survive"
    await plain.hset(redis_key(ns, "aliases"), b"s5", b"nobody")
    assert await q.send(["s5"], "stop") == [], "an alias whose worker is not registered under it"
    await plain.hset(redis_key(ns, "workers"), b"w-1", b"garbage")
    assert await q.heartbeat("w-1", {}, 30) is None, "an unreadable own record: register again"
    assert await plain.hexists(redis_key(ns, "aliases"), b"s1") == 0, "its alias was freed"
    assert any("unreadable" in w for w in warnings())


async def test_recover_frees_dead_workers_next_to_garbage(
    names: Callable[[str], str], open_queue: Any, plain: redis.asyncio.Redis
) -> None:
    ns = names("recover")
    q: RedisQueue = await open_queue(ns)
    await q.push([_task(f"r{i}") for i in range(4)])
    await q.register("w-dead", "slave", {}, 0.05)
    await q.register("w-live", "slave", {}, 600)
    dead_leases = await q.reserve("w-dead", 2)
    live_leases = await q.reserve("w-live", 1)
    await plain.hset(redis_key(ns, "workers"), b"w-garbage", b"\xc1")
    await plain.hset(redis_key(ns, "leased"), b"12345", b"no-colon")
    await plain.hset(redis_key(ns, "leased"), b"not-an-id", b"1:w-live")

    async def dead_one_gone() -> bool:
        await q.recover()
        return "w-dead" not in [w.worker for w in await q.workers()]

    await wait_until(dead_one_gone)  # its ttl passes on the server clock
    assert [w.worker for w in await q.workers()] == ["w-live"]
    assert await plain.hexists(redis_key(ns, "workers"), b"w-garbage") == 0, "the unreadable record is gone"
    assert [lease.task_id for lease in await q.leases("w-live")] == [live_leases[0].task_id]
    again = await q.reserve("w-live", 10)
    assert sorted(lease.payload for lease in again) == sorted([*(x.payload for x in dead_leases), b"payload-r3"])
    assert (await q.stats()).dead == 2, "the released id without a task, and the lease entry that is no id"


# -- 5. decoding: limits, and no memory blow-up -----------------------------------------


def test_msgpack_limits_refuse_forged_headers() -> None:
    forged_array = b"\xdd\xff\xff\xff\xff"  # an array of 4 294 967 295 items in 5 bytes
    forged_str = b"\x91\xdb\x7f\xff\xff\xff"  # a 2 GiB string
    for reply in (forged_array, forged_str, b"\x91\xc4\x01x", b"\x81\xa1a\xa1b", b"\xc1"):  # bin, map, invalid
        with pytest.raises(ValueError):
            _leases(reply, "w", 10)
    with pytest.raises(ValueError):
        connection.unpack(msgpack.packb(list(range(11))), 10)


async def test_oversized_payloads_are_quarantined(
    names: Callable[[str], str], open_queue: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connection, "MAX_PAYLOAD", 1000)
    connection._script_sources.cache_clear()
    try:
        q: RedisQueue = await open_queue(names("big-payload"))
        await q.push([NewTask(b"x" * 2000, K("huge"), unique=True), _task("fine")])
        (lease,) = await q.reserve("w", 10)
        assert lease.payload == b"payload-fine"
        (letter,) = await q.dead_letters()
        assert letter.payload == b"" and "2000 bytes" in letter.error and letter.key == K("huge")
    finally:
        connection._script_sources.cache_clear()


async def test_a_garbage_reply_is_a_backend_error(names: Callable[[str], str], open_queue: Any) -> None:
    q: RedisQueue = await open_queue(names("reply"))
    client = q._redis
    q._scripts["stats"] = client.register_script("return {{'a', 'b'}, {}}")
    q._scripts["reserve"] = client.register_script("return {'\\145\\221\\255\\255\\255\\255', {}}")  # forged
    q._scripts["workers"] = client.register_script("return {'not a table', {}}")
    for call in (q.stats, lambda: q.reserve("w", 5), q.workers):
        with pytest.raises(BackendError, match="unreadable reply") as error:
            await call()
        assert isinstance(error.value.__cause__, ValueError | TypeError | IndexError)
