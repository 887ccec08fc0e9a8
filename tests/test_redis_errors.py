"""Redis errors and configuration: transient states pause, nothing raw escapes, no secret shows.

``BUSY`` (someone's script past the busy threshold), ``LOADING``, failover
(``MASTERDOWN``, ``READONLY``) and Cluster redirections (``MOVED``, ``ASK``, ``TRYAGAIN``,
``CLUSTERDOWN``) are ``BackendUnavailable``: the loop pauses and resumes. Everything
else a driver raises becomes ``BackendError``, the original chained. URLs redis-py
would misread are refused, and no message shows a password.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis.asyncio
from redis._parsers import BaseParser

from achihuo_mini import AsyncLoop
from achihuo_mini.backend import NewTask, QueueStats
from achihuo_mini.errors import BackendError, BackendUnavailable, ConfigError
from achihuo_mini.testing import wait_until
from achihuo_mini_backends.redis_backend import RedisDoneSet, RedisQueue

from .conftest import RedisServer, SpiderFactory


@pytest.fixture
def server() -> Iterator[RedisServer]:
    """A redis-server of this test alone: its settings may change, a script may hang it."""
    own = RedisServer().start()
    yield own
    own.remove()


@pytest.fixture
async def admin(server: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(server.url)
    yield client
    await client.aclose()


async def _busy_until_killed(server: RedisServer, admin: redis.asyncio.Redis) -> asyncio.Future[Any]:
    """Start a script that never ends on a client of its own; return once the server answers BUSY."""
    await admin.config_set("lua-time-limit", 100)  # busy-reply-threshold, ms (the default is 5 s)
    runner = redis.asyncio.Redis.from_url(server.url)
    hang = asyncio.ensure_future(runner.eval("while true do end", 0))

    async def busy() -> bool:
        try:
            await admin.ping()
        except redis.exceptions.ResponseError as exc:
            return str(exc).startswith("BUSY")
        return False

    await wait_until(busy)

    async def close_runner(_: Any) -> None:
        await runner.aclose()

    hang.add_done_callback(lambda f: asyncio.ensure_future(close_runner(f)))
    return hang


async def _kill(admin: redis.asyncio.Redis, hang: asyncio.Future[Any]) -> None:
    await admin.script_kill()
    with pytest.raises(redis.exceptions.ResponseError, match="killed"):
        await hang


async def test_a_busy_server_is_unavailable_and_work_resumes(server: RedisServer, admin: redis.asyncio.Redis) -> None:
    q = RedisQueue("busy", url=server.url, socket_timeout=5)
    d = RedisDoneSet("busy", url=server.url, socket_timeout=5)
    await q.open()
    await d.open()
    try:
        await q.push([NewTask(b"a")])
        hang = await _busy_until_killed(server, admin)
        try:
            for call in (q.stats, lambda: q.reserve("w", 5), lambda: q.push([NewTask(b"b")]), d.count, q.workers):
                with pytest.raises(BackendUnavailable, match="BUSY") as error:
                    await call()
                assert isinstance(error.value.__cause__, redis.exceptions.ResponseError)
        finally:
            await _kill(admin, hang)
        assert await q.stats() == QueueStats(ready=1, delayed=0, leased=0, dead=0)
    finally:
        await q.close()
        await d.close()


class _Slow(AsyncLoop):
    started: asyncio.Event

    async def run(self) -> None:
        for i in range(20):
            self.add_task("work", i, task_name=f"t{i}", repeat=False)

    async def work(self, i: int) -> None:
        self.started.set()
        await asyncio.sleep(0.05)
        self.task_done(f"t{i}")


async def test_the_loop_pauses_while_redis_is_busy_and_finishes(
    server: RedisServer, admin: redis.asyncio.Redis, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    factory = SpiderFactory("redis", {"url": server.url}, tmp_path)
    loop = factory(_Slow, concurrency=4, debug=False, progress_interval=0)
    loop.started = asyncio.Event()
    serving = asyncio.ensure_future(loop.serve(idle_exit=0))
    await asyncio.wait_for(loop.started.wait(), 30)
    hang = await _busy_until_killed(server, admin)
    try:

        async def paused() -> bool:
            return "backend unreachable, pausing" in caplog.text

        await wait_until(paused, timeout=30)
    finally:
        await _kill(admin, hang)
    summary = await asyncio.wait_for(serving, 60)
    assert (summary.exit_code, summary.succeeded) == (0, 20), summary.reason
    assert "reachable again" in caplog.text


async def test_failover_states_are_unavailable(server: RedisServer, admin: redis.asyncio.Redis) -> None:
    """A replica refuses writes (READONLY); one that lost its master and serves no stale data, all (MASTERDOWN)."""
    q = RedisQueue("failover", url=server.url, socket_timeout=5)
    await q.open()
    try:
        await q.stats()  # scripts loaded
        await admin.execute_command("REPLICAOF", "127.0.0.1", str(RedisServer().port))  # nobody listens there
        with pytest.raises(BackendUnavailable, match="READONLY"):
            await q.push([NewTask(b"x")])
        await admin.config_set("replica-serve-stale-data", "no")
        with pytest.raises(BackendUnavailable, match="MASTERDOWN"):
            await q.stats()
        await admin.execute_command("REPLICAOF", "NO", "ONE")
        assert await q.push([NewTask(b"x")]) == 1
    finally:
        await q.close()


@pytest.mark.parametrize(
    "reply",
    [
        "MOVED 3999 127.0.0.1:6381",
        "ASK 3999 127.0.0.1:6381",
        "TRYAGAIN Multiple keys request during rehashing of slot",
        "CLUSTERDOWN The cluster is down",
        "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
        "READONLY You can't write against a read only replica.",
        "LOADING Redis is loading the dataset in memory",
        "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.",
        "NOREPLICAS Not enough good replicas to write.",
        "ERR Error running script (call to f_1): @user_script:9: -READONLY You can't write against a replica.",
    ],
)
def test_transient_replies_are_unavailable(reply: str) -> None:
    q = RedisQueue("codes")
    error = q._translate(BaseParser.parse_error(reply))
    assert isinstance(error, BackendUnavailable), error


@pytest.mark.parametrize("reply", ["ERR unknown command 'X'", "WRONGTYPE Operation against a key", "NOSCRIPT x"])
def test_other_replies_are_errors(reply: str) -> None:
    error = RedisQueue("codes")._translate(BaseParser.parse_error(reply))
    assert type(error) is BackendError


def _raiser(exc: BaseException) -> Any:
    async def call(*args: Any, **kwargs: Any) -> Any:
        raise exc

    return call


async def test_no_raw_exception_escapes(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    q = RedisQueue(f"raw-{uuid.uuid4().hex[:8]}", url=redis_url)
    await q.open()
    try:
        for raised in (ValueError("invalid literal for int()"), UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad")):
            monkeypatch.setattr(q._redis, "get", _raiser(raised))
            with pytest.raises(BackendError) as error:
                await q.stats()  # a script call first: the client is fine
                await q._run(q._redis.get(b"x"))
            assert error.value.__cause__ is raised and not isinstance(error.value, BackendUnavailable)
        monkeypatch.undo()
        protocol = redis.exceptions.InvalidResponse("Protocol Error: b'?'")
        monkeypatch.setattr(q._redis, "get", _raiser(protocol))
        with pytest.raises(BackendUnavailable) as unavailable:
            await q._run(q._redis.get(b"x"))
        assert unavailable.value.__cause__ is protocol
    finally:
        await q.close()


# -- 6. configuration: URLs and secrets --------------------------------------------------

SECRET_PARTS = ("s3Cr", "T9xq")


def _shown(exc: BaseException) -> str:
    """Every text an exception chain shows (messages and reprs)."""
    parts = []
    seen: BaseException | None = exc
    while seen is not None:
        parts += [str(seen), repr(seen)]
        seen = seen.__cause__ or seen.__context__
    return "\n".join(parts)


@pytest.mark.parametrize("char", ["#", "/", "?", "@", "#/?@"])
async def test_a_password_with_url_characters_is_never_shown(
    char: str, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Was: redis-py's parser split at ``#`` (and ``/``, ``?``): the rest of the password was shown."""
    caplog.set_level(logging.DEBUG)
    password = SECRET_PARTS[0] + char + SECRET_PARTS[1]
    host = redis_url.split("://", 1)[1]
    raw = f"redis://:{password}@{host}"
    try:
        q = RedisQueue("pw", url=raw)
    except ConfigError as exc:
        assert char != "@", "an '@' in the password is read correctly (up to the last '@')"
        text = _shown(exc)
        assert "redis url redis://:***@" in text and "percent-encoded" in text
    else:
        assert char == "@"
        assert q.location == f"redis://:***@{host}"
        await q.open()  # the test server needs no password: redis-py falls back
        await q.close()
    encoded = f"redis://:{quote(password, safe='')}@{host}"
    q = RedisQueue("pw", url=encoded)
    assert q.location == f"redis://:***@{host}"
    await q.open()
    await q.close()
    gone = RedisQueue("pw", url=f"redis://user:{quote(password, safe='')}@127.0.0.1:{RedisServer().port}/0")
    with pytest.raises(BackendUnavailable) as unavailable:
        await gone.open()
    for text in (_shown(unavailable.value), caplog.text, repr(q), q.location):
        assert not any(part in text for part in SECRET_PARTS), text


@pytest.mark.parametrize(
    "url",
    [
        "redis://:s3Cr3tT9xq@127.0.0.1:notaport/0",
        "redis://u:s3CrT9xq@[::1/0",
        "redis://127.0.0.1:6379/zero",
        "unix://:s3Cr/T9xq@/run/redis.sock",
        "unix://:s3Cr?T9xq@/run/redis.sock",
        "redis://:s3CrT9xq@h/0?db",
        "http://:s3CrT9xq@h/0",
        "127.0.0.1:6379",
    ],
)
def test_an_unreadable_url_is_a_config_error_naming_it_masked(url: str) -> None:
    with pytest.raises(ConfigError, match="redis url") as error:
        RedisQueue("x", url=url)
    text = _shown(error.value)
    assert not any(part in text for part in SECRET_PARTS), text


def test_driver_error_texts_are_masked() -> None:
    q = RedisQueue("mask")
    error = q._translate(redis.exceptions.ResponseError("ERR no route to redis://:s3CrT9xq@h/0?token=T9xq"))
    assert "s3Cr" not in str(error) and "T9xq" not in str(error) and "***" in str(error)
