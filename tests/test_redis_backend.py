"""Redis-specific tests: key layout, secrets, connection failures, durability, scripts,
the notifier, big batches and several OS processes on one queue.

The contract suite (tests/test_contract.py) covers the protocol semantics; these
tests cover what only the Redis backend promises. They use the ``redis_url``
fixture (REDIS_URL, or a redis-server the session starts) and clean up every key
of the namespaces they create.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import uuid
from asyncio.subprocess import DEVNULL, PIPE
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
from redis.crc import key_slot

from achihuo_mini import AsyncLoop, masking
from achihuo_mini.backend import Commit, NewTask, QueueStats, name_key
from achihuo_mini.backend_kit import lowest_free_alias
from achihuo_mini.config import build_backend_options
from achihuo_mini.errors import BackendError, BackendUnavailable, ConfigError
from achihuo_mini.masking import mask_secrets
from achihuo_mini.plugins import registry
from achihuo_mini.testing import wait_until
from achihuo_mini_backends.redis_backend import (
    BUCKET_BYTES,
    BUCKET_PART,
    KEY_PARTS,
    LEGACY_DONE_PART,
    MIN_REDIS_VERSION,
    RedisDoneSet,
    RedisQueue,
    _version,
    escape_namespace,
    mask_url,
    redis_key,
)

from .conftest import SpiderFactory

PROCS = Path(__file__).parent / "procs"
SECRET = "hunter2-s3cr3t"

EXPECTED_TYPES = {
    "seq": b"string",
    "tasks": b"hash",
    "meta": b"hash",
    "ready": b"list",
    "delayed": b"zset",
    "leased": b"hash",
    "pending": b"hash",
    "dcount": b"string",
    "dead": b"list",
    "wake": b"list",
    "workers": b"hash",
    "winfo": b"hash",
    "aliases": b"hash",
    "mailbox": b"hash",
    "stats": b"hash",
}


def hash_tag(key: bytes) -> bytes | None:
    """The Cluster hash tag of ``key`` by Redis's rule (first ``{``, next ``}``, non-empty)."""
    start = key.find(b"{")
    if start < 0:
        return None
    end = key.find(b"}", start + 1)
    return key[start + 1 : end] if end > start + 1 else None


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def plain(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    """A plain client to look at real keys (only those of our own namespaces)."""
    client = redis.asyncio.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def bucket_key(ns: str, digest: bytes) -> bytes:
    """The done-set bucket key of ``digest`` in loop ``ns``."""
    return redis_key(ns, BUCKET_PART) + digest[:BUCKET_BYTES]


@pytest.fixture
async def names(redis_url: str, plain: redis.asyncio.Redis) -> AsyncIterator[Callable[[str], str]]:
    """``names(label)``: a fresh namespace; every key of it is deleted after the test."""
    created: list[str] = []
    run = uuid.uuid4().hex[:8]

    def make(label: str = "ns") -> str:
        created.append(f"rt-{run}-{label}")
        return created[-1]

    yield make
    for ns in created:
        if await plain.exists(redis_key(ns, "dcount")):
            done = RedisDoneSet(ns, url=redis_url)
            await done.open()
            await done.clear()  # the buckets
            await done.close()
        await plain.delete(*(redis_key(ns, part) for part in (*KEY_PARTS, LEGACY_DONE_PART)))


@pytest.fixture
async def opened() -> AsyncIterator[list[RedisQueue | RedisDoneSet]]:
    """Backends appended here are closed after the test."""
    backends: list[RedisQueue | RedisDoneSet] = []
    yield backends
    for b in backends:
        await b.close()


@pytest.fixture
def open_queue(redis_url: str, opened: list[Any]) -> Callable[..., Any]:
    async def make(namespace: str, **options: Any) -> RedisQueue:
        q = RedisQueue(namespace, **{"url": redis_url, **options})
        opened.append(q)
        await q.open()
        return q

    return make


@pytest.fixture
def open_done(redis_url: str, opened: list[Any]) -> Callable[..., Any]:
    async def make(namespace: str, **options: Any) -> RedisDoneSet:
        d = RedisDoneSet(namespace, **{"url": redis_url, **options})
        opened.append(d)
        await d.open()
        return d

    return make


# -- keys --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "{", "}", "%", "%7B", "%7D", "%25", "{}", "}{", "a{b}c", "名字{🕷}"])
def test_escape_is_brace_free_and_injective(name: str) -> None:
    others = ["", "{", "}", "%", "%7B", "%7D", "%25", "{}", "}{", "a{b}c", "名字{🕷}"]
    escaped = escape_namespace(name)
    assert escaped and "{" not in escaped and "}" not in escaped
    assert [o for o in others if escape_namespace(o) == escaped] == [name]
    key = redis_key(name, "ready")
    assert hash_tag(key) == escaped.encode("utf-8", "surrogatepass"), "the whole escaped NAME is the hash tag"


async def test_every_key_carries_the_hash_tag(
    names: Callable[[str], str], open_queue: Any, open_done: Any, plain: redis.asyncio.Redis
) -> None:
    namespaces = [names("a{b}c:*?[x]"), names("}{ %7B%25 名字")]
    tags = set()
    for ns in namespaces:
        q: RedisQueue = await open_queue(ns)
        d: RedisDoneSet = await open_done(ns)
        await q.register("w-1", "master", {"host": "h"}, 30)
        await q.send(["m1"], "stop")  # a mailbox that is not read
        await q.push([NewTask(b"a", name_key("a")), NewTask(b"b", name_key("b")), NewTask(b"c"), NewTask(b"d")])
        await q.push([NewTask(b"later", delay=3600)])
        a, b, _ = await q.reserve("w-1", 3)
        await q.bury([(a, "boom")])
        await q.retry([(b, 3600)])
        await d.add([name_key("x")])
        await q.add_counts({"tasks/ok": 1})
        keys = [redis_key(ns, part) for part in KEY_PARTS]
        for part, key in zip(KEY_PARTS, keys, strict=True):
            assert await plain.exists(key) == 1, f"{part} key {key!r} should exist"
            assert await plain.type(key) == EXPECTED_TYPES[part], part
        for digest in (name_key("x"), name_key("done-a")):
            await d.add([digest])
            keys.append(bucket_key(ns, digest))
            assert await plain.type(keys[-1]) == b"hash"
        tag = hash_tag(keys[0])
        assert tag == escape_namespace(ns).encode()
        assert {hash_tag(k) for k in keys} == {tag}
        assert len({key_slot(k) for k in keys}) == 1, "one loop, one Cluster slot"
        tags.add(tag)
    assert len(tags) == 2


async def test_prefix_option(names: Callable[[str], str], open_queue: Any, plain: redis.asyncio.Redis) -> None:
    ns = names("prefixed")
    q: RedisQueue = await open_queue(ns, prefix="team7")
    try:
        await q.push([NewTask(b"x")])
        assert await plain.exists(redis_key(ns, "ready", prefix="team7")) == 1
        assert await plain.exists(redis_key(ns, "ready")) == 0
    finally:
        await plain.delete(*(redis_key(ns, part, prefix="team7") for part in KEY_PARTS))
    with pytest.raises(ConfigError, match="braces"):
        RedisQueue(ns, prefix="a{b}")


async def test_sharing_needs_same_server_db_prefix_and_name(redis_url: str) -> None:
    base = redis_url.rsplit("/", 1)[0]
    q = RedisQueue("shared", url=f"{base}/0")
    assert q.shares_done_set(RedisDoneSet("shared", url=f"{base}/0"))
    assert not q.shares_done_set(RedisDoneSet("shared", url=f"{base}/1")), "another db"
    assert not q.shares_done_set(RedisDoneSet("shared", url=f"{base}/0", prefix="other")), "another prefix"
    assert not q.shares_done_set(RedisDoneSet("shared2", url=f"{base}/0")), "another loop"


async def test_wake_tokens_stay_few_and_expire(
    names: Callable[[str], str], open_queue: Any, plain: redis.asyncio.Redis
) -> None:
    ns = names("tokens")
    q: RedisQueue = await open_queue(ns)
    for _ in range(5):
        await q.push([NewTask(b"x") for _ in range(100)])
    wake = redis_key(ns, "wake")
    assert 0 < await plain.llen(wake) <= 16
    assert 0 < await plain.ttl(wake) <= 60


async def test_equal_due_times_keep_push_order(names: Callable[[str], str], open_queue: Any) -> None:
    q: RedisQueue = await open_queue(names("due-order"))
    payloads = [f"d{i}".encode() for i in range(25)]  # ids 1..25: '10' < '2' as plain strings
    await q.push([NewTask(p, delay=0.05) for p in payloads])
    got: list[bytes] = []

    async def all_due() -> bool:
        got.extend(lease.payload for lease in await q.reserve("w", 100))
        return len(got) == len(payloads)

    await wait_until(all_due)
    assert got == payloads


async def test_ids_not_reused_after_clear(names: Callable[[str], str], open_queue: Any) -> None:
    q: RedisQueue = await open_queue(names("clear"))
    await q.push([NewTask(b"old")])
    (old,) = await q.reserve("w", 1)
    await q.clear("queue")
    await q.push([NewTask(b"new")])
    (new,) = await q.reserve("w", 1)
    assert new.task_id > old.task_id and new.attempt == old.attempt
    assert await q.commit([Commit(old, children=[NewTask(b"ghost")])]) == 0
    assert await q.commit([Commit(new)]) == 1
    assert await q.stats() == QueueStats(0, 0, 0, 0)


async def test_cleared_namespace_leaves_no_key(
    names: Callable[[str], str], open_queue: Any, open_done: Any, plain: redis.asyncio.Redis
) -> None:
    ns = names("gone")
    q: RedisQueue = await open_queue(ns)
    d: RedisDoneSet = await open_done(ns)
    await q.register("w", "slave", {}, 30)
    await q.send(["s1"], "stop")
    await q.push([NewTask(b"a", name_key("a")), NewTask(b"b", delay=60), NewTask(b"c")])
    a, _ = await q.reserve("w", 2)
    await q.bury([(a, "x")])
    await d.add([name_key("a")])
    await q.clear("queue")
    assert await plain.exists(redis_key(ns, "seq")) == 1, "dead letters keep the id counter"
    await q.clear("dead")
    assert await plain.exists(bucket_key(ns, name_key("a"))) == 1
    await d.clear()
    await q.unregister("w")
    assert await plain.exists(*(redis_key(ns, part) for part in KEY_PARTS)) == 0
    assert [k async for k in plain.scan_iter(match=redis_key(ns, "*"), count=1000)] == []


async def test_register_follows_the_alias_policy(names: Callable[[str], str], open_queue: Any) -> None:
    """The register script mirrors ``backend_kit.lowest_free_alias``: the lowest number no registered worker holds."""
    q: RedisQueue = await open_queue(names("aliases"))
    rng = random.Random(3)
    alive: dict[str, str] = {}
    for i in range(60):
        if alive and rng.random() < 0.4:
            worker = rng.choice(sorted(alive))
            await q.unregister(worker)
            del alive[worker]
            continue
        role = rng.choice(["master", "slave", "other"])
        expected = lowest_free_alias(role, alive.values())
        alive[f"w{i}"] = await q.register(f"w{i}", role, {}, 30)
        assert alive[f"w{i}"] == expected
    assert sorted((w.worker, w.alias) for w in await q.workers()) == sorted(alive.items())
    for worker in alive:
        await q.unregister(worker)


def test_minimum_version_is_enforced_by_number() -> None:
    assert MIN_REDIS_VERSION == (6, 2, 0)
    assert _version("6.0.20") < MIN_REDIS_VERSION <= _version("6.2.0") < _version("7.0.15") < _version("10.0.0")


# -- the done set --------------------------------------------------------------------


async def test_done_set_is_compact_hash_buckets_with_a_counter(
    names: Callable[[str], str], open_done: Any, plain: redis.asyncio.Redis
) -> None:
    ns = names("buckets")
    d: RedisDoneSet = await open_done(ns)
    digests = [name_key(f"n{i}") for i in range(3000)]
    assert await d.add(digests + digests[:10]) == 3000
    assert await d.count() == 3000 and await plain.get(redis_key(ns, "dcount")) == b"3000"
    buckets = {bucket_key(ns, k) for k in digests}
    assert len(buckets) > 2900, "2 digest bytes pick one of 65 536 buckets"
    for digest in digests[:50]:
        key = bucket_key(ns, digest)
        assert await plain.hget(key, digest[BUCKET_BYTES:]) == b"", "field: the rest of the digest; value: empty"
        assert await plain.object("encoding", key) in (b"listpack", b"ziplist")
        assert hash_tag(key) == escape_namespace(ns).encode()
    assert sum([await plain.hlen(key) for key in buckets]) == 3000
    absent = name_key("absent")
    assert await d.remove(digests[:1000] + digests[:5] + [absent]) == 1000
    assert await d.count() == 2000
    assert await d.contains([digests[0], digests[1000], absent]) == [False, True, False]
    assert await d.remove(digests) == 2000
    assert await d.count() == 0
    assert await plain.exists(redis_key(ns, "dcount"), *buckets) == 0, "emptied buckets and counter go away"


async def test_done_counter_stays_exact_through_commits_and_pushes(
    names: Callable[[str], str], open_queue: Any, open_done: Any
) -> None:
    ns = names("counter")
    q: RedisQueue = await open_queue(ns)
    d: RedisDoneSet = await open_done(ns)
    a, b, x, zz = (name_key(n) for n in ("a", "b", "x", "zz"))
    assert await q.push([NewTask(b"a", a, unique=True), NewTask(b"b", b, unique=True)]) == 2
    la, lb = await q.reserve("w", 2)
    assert await q.commit([Commit(la, done=[a, a, x], undone=[zz])]) == 1
    assert await d.count() == 2
    children = [NewTask(b"a again", a, unique=True), NewTask(b"new", name_key("new"), unique=True)]
    assert await q.commit([Commit(lb, done=[b], undone=[x], children=children)]) == 1
    assert await d.count() == 2 and await d.contains([a, b, x]) == [True, True, False]
    assert await q.stats() == QueueStats(ready=1, delayed=0, leased=0, dead=0), "the done child was skipped"
    assert await q.commit([Commit(la, done=[zz], undone=[a])]) == 0, "fenced: writes nothing"
    assert await d.count() == 2
    assert await q.push([NewTask(b"a", a, unique=True), NewTask(b"x", x, unique=True)]) == 1
    assert await q.push([NewTask(b"a", a)]) == 1, "not unique: not checked"
    await d.clear()
    assert await d.count() == 0 and await d.contains([a, b]) == [False, False]
    assert await q.push([NewTask(b"b", b, unique=True)]) == 1, "b was done, is not pending"


async def test_scripts_find_buckets_only_in_keys(names: Callable[[str], str], open_done: Any) -> None:
    """Redis Cluster: every key a script touches is in KEYS; a bucket that is not is an error."""
    d: RedisDoneSet = await open_done(names("keys"))
    a, b = name_key("a"), name_key("b")
    assert a[:BUCKET_BYTES] != b[:BUCKET_BYTES]
    assert sorted(d._bucket_keys([a, b, a])) == sorted([bucket_key(d.namespace, a), bucket_key(d.namespace, b)])
    for keys in (d._keys, [*d._keys, bucket_key(d.namespace, b)]):
        with pytest.raises(redis.exceptions.ResponseError, match="not in KEYS"):
            await d._scripts["done_contains"](keys=keys, args=[a], client=d._redis)
    assert await d.contains([a, b]) == [False, False]


async def test_old_done_set_moves_into_buckets_at_open(
    names: Callable[[str], str],
    open_queue: Any,
    open_done: Any,
    plain: redis.asyncio.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ns = names("migrate")
    digests = [name_key(f"old-{i}") for i in range(2500)]
    # An earlier move that crashed after adding a chunk to the buckets, before removing it from the SET.
    d: RedisDoneSet = await open_done(ns)
    assert await d.add(digests[:300]) == 300
    await d.close()
    old = redis_key(ns, LEGACY_DONE_PART)
    assert await plain.sadd(old, *digests) == 2500
    caplog.set_level(logging.INFO, logger="achihuo_mini.backends.redis")
    d = await open_done(ns)
    assert await plain.exists(old) == 0, "the old SET is gone"
    assert await d.count() == 2500
    assert all(await d.contains(digests))
    (moved,) = [r for r in caplog.records if "old SET" in r.getMessage()]
    assert moved.levelno == logging.INFO and "moved 2500 done names (2200 new)" in moved.getMessage()
    caplog.clear()
    await open_done(ns)  # a second open finds nothing to move
    assert not [r for r in caplog.records if "old SET" in r.getMessage()]
    q: RedisQueue = await open_queue(ns)
    assert await q.push([NewTask(b"old", digests[7], unique=True)]) == 0, "a moved name is done for the queue too"
    await d.clear()
    assert await d.count() == 0


# -- secrets -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://user:pw@h:6379/0", "redis://user:***@h:6379/0"),
        ("rediss://user:p%40ss@h/2", "rediss://user:***@h/2"),
        ("redis://pw@h/0", "redis://***@h/0"),
        ("unix://:pw@/run/redis.sock?db=3", "unix://:***@/run/redis.sock?db=3"),
        ("redis://h/0?password=pw&db=1", "redis://h/0?password=***&db=1"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ],
)
def test_location_is_masked(url: str, masked: str) -> None:
    """``location`` follows the project's one masking policy (a ``?password=`` too: redis-py reads it)."""
    assert RedisQueue("x", url=url).location == masked == mask_secrets(url)
    assert mask_url is masking.mask_url, "the backend re-exports the project's function"


def _chain_text(exc: BaseException) -> str:
    parts = []
    seen: BaseException | None = exc
    while seen is not None:
        parts += [str(seen), repr(seen)]
        seen = seen.__cause__ or seen.__context__
    return "\n".join(parts)


async def test_password_never_shown(
    redis_url: str, names: Callable[[str], str], opened: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    host_part = redis_url.split("://", 1)[1]
    ns = names("secret")
    # A password the server does not need: redis-py's fallback connects anyway.
    q = RedisQueue(ns, url=f"redis://:{SECRET}@{host_part}")
    d = RedisDoneSet(ns, url=f"redis://:{SECRET}@{host_part}")
    opened += [q, d]
    await q.open()
    await d.open()
    assert q.shares_done_set(d)
    for b in (q, d):
        assert SECRET not in b.location and "***" in b.location
        assert SECRET not in repr(b)
    # A user that does not exist: the server refuses the credentials.
    wrong = RedisQueue(ns, url=f"redis://nobody-{uuid.uuid4().hex[:6]}:{SECRET}@{host_part}")
    with pytest.raises(BackendError) as refused:
        await wrong.open()
    # Nobody listens: unavailable.
    gone = RedisQueue(ns, url=f"redis://:{SECRET}@127.0.0.1:{closed_port()}/0", connect_timeout=1)
    with pytest.raises(BackendUnavailable) as unavailable:
        await gone.open()
    for error in (refused.value, unavailable.value):
        assert "***" in str(error)
        assert SECRET not in _chain_text(error)
    assert SECRET not in caplog.text


# -- connection failures --------------------------------------------------------------


async def test_closed_port_fails_fast() -> None:
    q = RedisQueue("unreachable", url=f"redis://127.0.0.1:{closed_port()}/0", connect_timeout=2)
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match="unavailable"):
        await q.open()
    assert time.monotonic() - started < 2
    with pytest.raises(BackendError, match="not open"):
        await q.stats()
    await q.close()


async def test_silent_server_fails_within_connect_timeout() -> None:
    """A port that accepts connections but never answers: open() gives up, it does not hang."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # the kernel completes handshakes; nobody ever replies
        port = listener.getsockname()[1]
        q = RedisQueue("silent", url=f"redis://127.0.0.1:{port}/0", connect_timeout=0.3, socket_timeout=30)
        started = time.monotonic()
        with pytest.raises(BackendUnavailable, match=r"0\.3 s"):
            await q.open()
        assert time.monotonic() - started < 2
        await q.close()


def test_options_through_the_registry(redis_url: str) -> None:
    spec = registry.get("redis")
    assert spec.scope == "network"
    opts = build_backend_options(spec, {"url": redis_url}, source="test")
    assert opts["connect_timeout"] == 5.0 and opts["socket_timeout"] > 0
    assert spec.create_queue is not None
    q = spec.create_queue("opt", dict(opts))
    assert isinstance(q, RedisQueue) and q.location == redis_url
    with pytest.raises(ConfigError, match="unknown option"):
        build_backend_options(spec, {"host": "x"}, source="test")
    with pytest.raises(ConfigError, match="redis url"):
        RedisQueue("x", url="http://:pw@example.com/")


def test_missing_driver_says_what_to_install() -> None:
    code = (
        "import sys; sys.modules['redis'] = None\n"
        "from achihuo_mini_backends.redis_backend import RedisQueue\n"
        "try:\n    RedisQueue('x')\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    assert "PluginError" in out.stdout and "pip install redis" in out.stdout


# -- durability ----------------------------------------------------------------------


async def test_durability_reported(names: Callable[[str], str], open_queue: Any, open_done: Any, plain: Any) -> None:
    q: RedisQueue = await open_queue(names("dur"))
    d: RedisDoneSet = await open_done(names("dur"))
    assert q.durability in ("volatile", "everysec", "always", "unknown")
    assert d.durability == q.durability
    if os.environ.get("REDIS_URL"):
        return  # somebody else's server, whose settings we do not change
    assert q.durability == "volatile", "the test server runs without AOF"
    assert "appendonly='no'" in q.durability_detail
    before = {**await plain.config_get("appendonly"), **await plain.config_get("appendfsync")}
    before = {k.decode() if isinstance(k, bytes) else k: v for k, v in before.items()}
    try:
        await plain.config_set("appendfsync", "everysec")
        await plain.config_set("appendonly", "yes")
        assert (await open_queue(names("dur"))).durability == "everysec"
        await plain.config_set("appendfsync", "always")
        assert (await open_queue(names("dur"))).durability == "always"
    finally:
        await plain.config_set("appendonly", before["appendonly"])
        await plain.config_set("appendfsync", before["appendfsync"])


# -- scripts -----------------------------------------------------------------------


async def _commandstats(client: redis.asyncio.Redis) -> Counter[str]:
    stats = await client.info("commandstats")
    return Counter({name: int(v["calls"]) for name, v in stats.items()})


async def test_scripts_loaded_once_per_client(
    names: Callable[[str], str], open_queue: Any, plain: redis.asyncio.Redis
) -> None:
    before = await _commandstats(plain)
    q: RedisQueue = await open_queue(names("scripts"))
    scripts = dict(q._scripts)
    for i in range(20):
        await q.push([NewTask(f"p{i}".encode())])
    assert len(await q.reserve("w", 100)) == 20
    after = await _commandstats(plain)
    delta = after - before
    assert delta["cmdstat_evalsha"] >= 21
    assert delta["cmdstat_eval"] == 0, "script text is never sent with EVAL"
    loads = sum(n for name, n in delta.items() if name.startswith("cmdstat_script"))
    assert loads <= 2, f"each script is loaded at most once: {delta}"
    assert q._scripts == scripts and all(q._scripts[n] is scripts[n] for n in scripts)
    assert all(await plain.script_exists(q._scripts["push"].sha, q._scripts["reserve"].sha))


async def test_cancelling_a_call_always_cancels(names: Callable[[str], str], open_queue: Any) -> None:
    """Python 3.11's ``asyncio.wait_for`` (used by redis-py's socket timeout) can swallow a
    cancellation; a heartbeat task would then keep running after shutdown cancelled it."""
    q: RedisQueue = await open_queue(names("cancel"))
    await q.register("w", "master", {}, 30)

    async def beat() -> None:
        while True:
            await q.heartbeat("w", {}, 30)

    rng = random.Random(7)
    for _ in range(100):
        task = asyncio.ensure_future(beat())
        await asyncio.sleep(rng.random() * 0.002)  # cancel at a random point of a call (not a wait for a state)
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=5)
        assert done and task.cancelled(), "the cancellation was swallowed"
    assert await q.heartbeat("w", {}, 30) == [], "the client is still usable"
    await q.unregister("w")


# -- notifier -------------------------------------------------------------------------


async def test_idle_wait_blocks_instead_of_polling(
    names: Callable[[str], str], open_queue: Any, plain: redis.asyncio.Redis
) -> None:
    q: RedisQueue = await open_queue(names("idle"))
    await q.wait_for_tasks(0.01)  # the server may not know the script yet (NOSCRIPT, SCRIPT LOAD)
    before = await _commandstats(plain)
    started = time.monotonic()
    await q.wait_for_tasks(0.4)
    elapsed = time.monotonic() - started
    delta = await _commandstats(plain) - before
    assert 0.35 <= elapsed < 3
    assert delta["cmdstat_blpop"] == 1
    assert delta["cmdstat_evalsha"] == 1, "one readiness check, then one blocking wait"


async def test_wait_is_capped_by_next_delayed_task(names: Callable[[str], str], open_queue: Any) -> None:
    ns = names("capped")
    q: RedisQueue = await open_queue(ns)
    other: RedisQueue = await open_queue(ns)
    await other.push([NewTask(b"soon", delay=0.3)])
    await q.wait_for_tasks(0.05)  # drain the push's wake-up token
    started = time.monotonic()
    await q.wait_for_tasks(30)
    assert time.monotonic() - started < 2, "the wait ends when the delayed task is due"
    (lease,) = await q.reserve("w", 5)
    assert lease.payload == b"soon"


async def test_waiters_wake_on_push(names: Callable[[str], str], open_queue: Any) -> None:
    ns = names("wake")
    waiters = [await open_queue(ns) for _ in range(3)]
    pusher: RedisQueue = await open_queue(ns)
    tasks = [asyncio.ensure_future(w.wait_for_tasks(30)) for w in waiters]
    await asyncio.sleep(0.05)  # let them block; tokens pushed before a BLPOP are not lost either
    await pusher.push([NewTask(b"x") for _ in range(3)])
    await asyncio.wait_for(asyncio.gather(*tasks), 10)


# -- big batches --------------------------------------------------------------------


async def test_big_batches(names: Callable[[str], str], open_queue: Any, open_done: Any) -> None:
    ns = names("big")
    q: RedisQueue = await open_queue(ns)
    d: RedisDoneSet = await open_done(ns)
    n = 20_000
    assert await q.push([NewTask(str(i).encode(), name_key(str(i)), unique=True) for i in range(n)]) == n
    leases = await q.reserve("w", n)
    assert [lease.payload for lease in leases] == [str(i).encode() for i in range(n)]
    children = [NewTask(b"c%d" % i, name_key(f"c{i}"), unique=True) for i in range(10_000)]
    done = [lease.key for lease in leases if lease.key]
    assert await q.commit([Commit(leases[0], done=done, children=children)]) == 1
    assert await d.count() == n
    assert await q.commit([Commit(lease) for lease in leases[1:]]) == n - 1
    assert await q.stats() == QueueStats(ready=10_000, delayed=0, leased=0, dead=0)
    assert await q.push(children) == 0, "children are pending"
    await q.clear("queue")
    await d.clear()


class PrivateRedis:
    """A redis-server of this test alone (AOF, fsync always), which it may stop and restart."""

    def __init__(self, folder: Path) -> None:
        exe = os.environ.get("REDIS_SERVER") or shutil.which("redis-server")
        if not exe:
            pytest.fail("this test needs redis-server (apt-get install redis-server, or set REDIS_SERVER)")
        self.exe, self.folder, self.port = exe, folder, closed_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
            "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--loglevel", "warning",
            stdout=DEVNULL, stderr=DEVNULL,
        )  # fmt: skip

        async def answers() -> bool:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                return False
            writer.write(b"PING\r\n")
            reply = await reader.readline()
            writer.close()
            await writer.wait_closed()
            return reply.startswith(b"+PONG")

        await wait_until(answers)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    await server.start()
    yield server
    await server.stop()


async def test_outage_is_unavailable_and_work_resumes(private_redis: PrivateRedis) -> None:
    q = RedisQueue("outage", url=private_redis.url, connect_timeout=1, socket_timeout=2)
    idle = RedisDoneSet("outage", url=private_redis.url)  # its pooled connection goes stale unnoticed
    await q.open()
    await idle.open()
    try:
        assert q.durability == "always"
        await q.push([NewTask(b"a"), NewTask(b"b")])
        (lease,) = await q.reserve("w", 1)
        assert await idle.add([name_key("a")]) == 1
        await private_redis.stop()
        with pytest.raises(BackendUnavailable):
            await q.stats()
        await private_redis.start()  # same port, same AOF
        assert await idle.count() == 1, "a stale pooled connection is replaced, not used"
        assert await q.stats() == QueueStats(ready=1, delayed=0, leased=1, dead=0)
        assert await q.commit([Commit(lease)]) == 1, "a commit held back by the outage still applies"
    finally:
        await q.close()
        await idle.close()


# -- several processes -----------------------------------------------------------------


@pytest.fixture
async def procs() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """Processes appended here are killed (if still running) and reaped after the test."""
    started: list[asyncio.subprocess.Process] = []
    yield started
    for p in started:
        if p.returncode is None:
            p.kill()
            await p.communicate()


@pytest.mark.processes
async def test_four_processes_deliver_each_task_exactly_once(
    redis_url: str,
    names: Callable[[str], str],
    open_queue: Any,
    tmp_path: Path,
    procs: list[asyncio.subprocess.Process],
) -> None:
    ns = names("procs")
    q: RedisQueue = await open_queue(ns)
    total = 4000
    for start in range(0, total, 1000):
        await q.push([NewTask(f"task-{i}".encode()) for i in range(start, start + 1000)])
    outs = [tmp_path / f"out-{i}.txt" for i in range(4)]
    for out in outs:
        procs.append(
            await asyncio.create_subprocess_exec(
                sys.executable,
                str(PROCS / "queue_worker.py"),
                "consume",
                "redis",
                json.dumps({"url": redis_url}),
                ns,
                str(out),
                "25",
                stdin=PIPE,
                stdout=PIPE,
                stderr=PIPE,
            )
        )
    for p in procs:  # wait until each has connected, then start them together
        assert p.stdout is not None and p.stdin is not None
        line = await asyncio.wait_for(p.stdout.readline(), 30)
        assert line == b"ready\n", line
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(b"go\n")
        await p.stdin.drain()
    results = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), 60)
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [err.decode() for _, err in results]
    delivered = Counter(line for out in outs for line in out.read_text().splitlines())
    assert [t for t, n in delivered.items() if n > 1] == [], "no task delivered twice"
    assert set(delivered) == {f"task-{i}" for i in range(total)}, "no task missing"
    assert sum(1 for out in outs if out.read_text()) >= 2, "the processes shared the work"
    assert await q.stats() == QueueStats(0, 0, 0, 0)


class _Tree(AsyncLoop):
    """Task i adds 2i+1 and 2i+2 (new) and 0 (a repeat), like a crawl's links."""

    N = 400

    async def run(self) -> None:
        self.add_task("node", 0, task_name="n0", repeat=False)

    async def node(self, i: int) -> None:
        for j in (2 * i + 1, 2 * i + 2, 0):
            if j < self.N:
                self.add_task("node", j, task_name=f"n{j}", repeat=False)
        self.task_done(f"n{i}")


@pytest.fixture
def redis_spiders(redis_url: str, tmp_path: Path) -> Iterator[SpiderFactory]:
    factory = SpiderFactory("redis", {"url": redis_url}, tmp_path)
    yield factory
    factory.cleanup()


async def test_round_trips_per_task_stay_well_under_two(redis_spiders: SpiderFactory) -> None:
    """Design: the hot path makes about two amortised backend round trips per task or fewer.

    Reserve and commit are batched over concurrent handlers, children and done names ride
    with the commit: a tree crawl of 400 tasks with 3 adds each (one a repeat) is counted."""
    loop = redis_spiders(_Tree, concurrency=16, debug=False, progress_interval=0)
    summary = await loop.serve(idle_exit=0)
    assert summary.succeeded == _Tree.N and summary.exit_code == 0
    store = loop._AsyncLoop__core.store  # white box: the backends the loop served with
    trips = store.raw_queue.round_trips + store.raw_done.round_trips
    per_task = trips / _Tree.N
    print(f"{trips} round trips for {_Tree.N} tasks: {per_task:.2f} per task")
    assert per_task <= 1.0, f"{per_task:.2f} round trips per task"
