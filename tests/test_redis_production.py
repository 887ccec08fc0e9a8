"""Redis as production runs it: a Cluster (``redis+cluster://``) and Sentinel failover
(``redis+sentinel://``), on real servers these tests start from ``redis-server``.

Marked ``redis_cluster`` and ``redis_sentinel``: the README's test command leaves them out;
``python -m pytest -m "redis_cluster or redis_sentinel"`` runs them (``.ci/run`` does).
The URL parsing and the one-slot rule of every key builder run in the default suite.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.crc import key_slot

from achihuo_mini import AsyncLoop, ConfigError
from achihuo_mini.testing import BackendContract, wait_until
from achihuo_mini_backends.redis_backend.connection import parse_topology
from achihuo_mini_backends.redis_backend.keys import KEY_PARTS, bucket_keys, redis_key

from .conftest import write_backend_config
from .http_site import Site
from .redis_topologies import Cluster, Sentinels
from .test_no_loss import FAST_LOOP

FAILOVER_SPIDER = Path(__file__).parent / "procs" / "failover_spider.py"


# -- the URLs and the one-slot rule (no server needed) ------------------------------------------


def test_sentinel_and_cluster_urls_are_read() -> None:
    t = parse_topology("redis+sentinel://:s%40cret@h1:26379,[::1]:26380,h3/mymaster/2")
    assert t.kind == "sentinel" and t.service == "mymaster" and t.db == 2
    assert t.nodes == (("h1", 26379), ("::1", 26380), ("h3", 26379)) and t.password == "s@cret" and t.username is None
    c = parse_topology("redis+cluster://user:pw@10.0.0.1:7000,10.0.0.2:7001")
    assert c.kind == "cluster" and c.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 7001)) and c.username == "user"
    assert "pw" not in repr(c.params())


def test_a_password_may_hold_a_slash_and_never_shows_in_an_error() -> None:
    assert parse_topology("redis+cluster://:SECRETpw/xyz@127.0.0.1:31001").password == "SECRETpw/xyz"
    t = parse_topology("redis+sentinel://u:SECRET/pw@h1:26379/svc")
    assert (t.username, t.password, t.service, t.nodes) == ("u", "SECRET/pw", "svc", (("h1", 26379),))
    with pytest.raises(ConfigError) as caught:
        parse_topology("redis+cluster://:SECRETpw/xyz@127.0.0.1:99999")
    assert "SECRET" not in str(caught.value)


def test_a_cluster_that_no_node_answers_is_an_outage_not_an_error() -> None:
    from redis.exceptions import RedisClusterUnreachableError

    from achihuo_mini.errors import BackendUnavailable
    from achihuo_mini_backends.redis_backend import RedisQueue

    q = RedisQueue("x", url="redis+cluster://127.0.0.1:7000")
    assert isinstance(q._translate(RedisClusterUnreachableError("no node")), BackendUnavailable)


@pytest.mark.parametrize(
    "url, message",
    [
        ("redis+sentinel://h1:26379", "expected /<service name>"),
        ("redis+sentinel://h1:26379/m/x", "the database must be a number"),
        ("redis+sentinel://h1:26379/m/0/more", "expected /<service name>"),
        ("redis+sentinel://h1:99999/m", "is not HOST:PORT"),
        ("redis+sentinel://:pw@h1:26379/m?x=1", "do not take"),
        ("redis+cluster://h1:7000/3", "database 0 only"),
        ("redis+cluster://h1:\u0667\u0660\u0660\u0660", "is not HOST:PORT"),  # Arabic-Indic digits
        ("redis+sentinel://h1:26379/m/99999999999999999999", "the database must be a number"),
        ("redis+cluster://h1:7000,:7001", "is not HOST:PORT"),
        ("redis+cluster://:se#cret@h1:7000", "percent-encoded"),
    ],
)
def test_a_bad_topology_url_is_a_clear_error_that_shows_no_password(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        parse_topology(url)
    assert "pw" not in str(caught.value) and "cret" not in str(caught.value)


@pytest.mark.parametrize("name", ["plain", "with{braces}", "{", "}", "", "%7B", "ünï cödé", "a}{b"])
def test_every_key_of_a_loop_is_in_one_cluster_slot(name: str) -> None:
    """Every script gets the loop's fixed keys, done-set buckets and per-host keys: one slot, always."""
    keys = [redis_key(name, part) for part in KEY_PARTS]
    keys += bucket_keys(redis_key(name, "d:"), [bytes([i, j]) + b"x" * 14 for i in (0, 255) for j in (0, 7, 255)])
    keys += [redis_key(name, "h:" + host) for host in ("example.com", "{evil}", "}")]
    keys += [redis_key(name, part, prefix="other") for part in KEY_PARTS]
    assert len({key_slot(k) for k in keys[: -len(KEY_PARTS)]}) == 1, "one slot per loop"
    assert len({key_slot(k) for k in keys[-len(KEY_PARTS) :]}) == 1


# -- Redis Cluster ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster(3).start()
    yield c
    c.remove()


@pytest.mark.redis_cluster
class TestContractOnCluster(BackendContract):
    @pytest.fixture
    def backend_name(self) -> str:
        return "redis"

    @pytest.fixture
    def backend_options(self, cluster: Cluster) -> dict[str, Any]:
        return {"url": cluster.url}


class Counting(AsyncLoop):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(debug=False, **{**FAST_LOOP, **kwargs})
        self.ran: list[int] = []

    async def count(self, i: int) -> None:
        await asyncio.sleep(0.002)
        self.ran.append(i)
        self.stats.inc("items")
        self.task_done(f"t{i}")


def _names_on_every_node(cluster: Cluster, n: int) -> list[str]:
    """Loop NAMEs whose slots are served by ``n`` different primaries."""
    names: dict[int, str] = {}
    while len(names) < n:
        name = f"t-cl-{uuid.uuid4().hex[:8]}"
        names.setdefault(cluster.owner(key_slot(redis_key(name, "seq"))), name)
    return list(names.values())


@pytest.fixture
async def cluster_loops(cluster: Cluster, tmp_path: Path) -> AsyncIterator[list[AsyncLoop]]:
    config = write_backend_config(tmp_path / "c.toml", "redis", {"url": cluster.url})
    loops = [type("Counting", (Counting,), {"NAME": name})(config_file=config, concurrency=8)
             for name in _names_on_every_node(cluster, 3)]  # fmt: skip
    yield loops
    from achihuo_mini._store import Store

    for loop in loops:
        async with Store(loop.name, loop.settings) as store:
            await store.clear("all")


@pytest.mark.redis_cluster
async def test_three_loops_on_three_primaries_at_once(cluster_loops: list[AsyncLoop]) -> None:
    for loop in cluster_loops:
        for i in range(300):
            loop.add_task("count", i, task_name=f"t{i}")
    summaries = await asyncio.wait_for(asyncio.gather(*(loop.serve(idle_exit=0.5) for loop in cluster_loops)), 120)
    for loop, summary in zip(cluster_loops, summaries, strict=True):
        assert summary.exit_code == 0 and summary.succeeded == 300, loop.name
        assert sorted(loop.ran) == list(range(300))  # type: ignore[attr-defined]
    config = str(cluster_loops[0].settings.config_path)
    listed = subprocess.run([sys.executable, "-m", "achihuo_mini", "loops", "--config", config],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert listed.returncode == 0 and set(listed.stdout.split()) >= {loop.name for loop in cluster_loops}, (
        "`achihuo loops` lists the loops of every primary"
    )


@pytest.mark.redis_cluster
async def test_moving_a_loops_slot_while_it_runs_loses_nothing(
    cluster: Cluster, cluster_loops: list[AsyncLoop]
) -> None:
    loop = cluster_loops[0]
    n = 1500
    for i in range(n):
        loop.add_task("count", i, task_name=f"t{i}")
    running = asyncio.create_task(loop.serve(idle_exit=1.0))
    await wait_until(lambda: asyncio.sleep(0, len(loop.ran) >= 100), timeout=60)  # type: ignore[attr-defined]
    slot = key_slot(redis_key(loop.name, "seq"))
    source = cluster.owner(slot)
    target = next(p for p in cluster.ports if p != source)
    moved = await asyncio.to_thread(cluster.migrate_slot, slot, target, 0.01)
    assert moved > 10 and cluster.owner(slot) == target
    summary = await asyncio.wait_for(running, 180)
    assert summary.exit_code == 0 and summary.failed == 0
    assert set(loop.ran) == set(range(n)), "every task ran (at least once)"  # type: ignore[attr-defined]
    from achihuo_mini._store import Store

    async with Store(loop.name, loop.settings) as store:
        stats = await store.stats()
        assert (stats.ready, stats.delayed, stats.leased, stats.dead) == (0, 0, 0, 0)
        assert await store.done_count() == n


# -- Sentinel failover ----------------------------------------------------------------------------


@pytest.fixture
def sentinels() -> Iterator[Sentinels]:
    s = Sentinels().start()
    yield s
    s.remove()


@pytest.mark.redis_sentinel
@pytest.mark.processes
async def test_a_crawl_survives_a_failover(sentinels: Sentinels, site: Site, tmp_path: Path) -> None:
    """Mid-crawl the primary is SIGKILLed; Sentinel promotes the replica; the crawl completes."""
    name = f"t-failover-{uuid.uuid4().hex[:8]}"
    pages = 120
    config = write_backend_config(tmp_path / "c.toml", "redis", {"url": sentinels.url, "connect_timeout": 1.0,
                                                                  "socket_timeout": 2.0},
                                  {**FAST_LOOP, "concurrency": 4, "lease_timeout": 10.0})  # fmt: skip
    env = {**os.environ, "SPIDER_NAME": name, "ACHIHUO_CONFIG": str(config), "SITE_URL": site.url.rstrip("/"),
           "PAGES": str(pages), "SLEEP": "0.4"}  # fmt: skip
    logs = [tmp_path / "slave.log", tmp_path / "master.log"]
    procs: list[subprocess.Popen[bytes]] = []
    describe = lambda: "\n".join(p.read_text(errors="replace")[-4000:] for p in logs)  # noqa: E731
    try:
        with open(logs[0], "wb") as out:  # the slave runs until `stop all`
            procs.append(subprocess.Popen([sys.executable, str(FAILOVER_SPIDER), "start", "-s"], env=env,
                                          stdout=out, stderr=out))  # fmt: skip
        await wait_until(lambda: asyncio.sleep(0, "registered as" in logs[0].read_text()), timeout=30,
                         describe=describe)  # fmt: skip
        with open(logs[1], "wb") as out:
            procs.append(subprocess.Popen([sys.executable, str(FAILOVER_SPIDER), "start", "--idle-exit", "3"],
                                          env=env, stdout=out, stderr=out))  # fmt: skip
        await wait_until(lambda: asyncio.sleep(0, sum(site.hits.values()) >= 30), timeout=60, describe=describe)
        await asyncio.to_thread(sentinels.kill_primary)  # returns once the replica is promoted
        promoted_at = sum(site.hits.values())
        assert promoted_at < pages, "the failover happened mid-crawl: pages were left for the new primary"
        assert await asyncio.to_thread(procs[1].wait, 180) == 0, describe()
        unique = {key for key in site.hits if key.startswith("p")}
        assert unique == {f"p{i}" for i in range(pages)}, "every page was crawled"
        duplicates = sum(site.hits[k] for k in unique) - pages
        print(f"failover: {pages} pages, {duplicates} fetched twice or more (tasks whose ack the failover lost)")
        # A failover loses the writes the replica had not received yet: the acks of tasks that
        # finished just before it run again. Each worker runs at most `concurrency` (4) at once,
        # and the outage (about 3 s) is shorter than lease_timeout: no lease is recovered meanwhile.
        assert duplicates <= 2 * 4, "at most the tasks in flight on the two workers, re-run"

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, str(FAILOVER_SPIDER), *args], env=env, capture_output=True,
                                  text=True, timeout=120)  # fmt: skip

        status = cli("status", "--json")
        assert status.returncode == 0, status.stderr
        data = json.loads(status.stdout)
        assert f"primary 127.0.0.1:{sentinels.replica.port}" in data["queue"]["location"]
        assert data["done"]["count"] == pages and data["queue"]["ready"] == 0
        assert [w["alias"] for w in data["workers"]] == ["s1"]
        stop = cli("stop", "all")
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert await asyncio.to_thread(procs[0].wait, 60) == 0
        assert "is unavailable" in logs[1].read_text() + logs[0].read_text(), "the outage was seen and waited out"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.redis_sentinel
async def test_wait_replicas_confirms_each_write_on_the_replicas(
    sentinels: Sentinels, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from achihuo_mini.backend import NewTask
    from achihuo_mini_backends.redis_backend import RedisQueue

    config = write_backend_config(tmp_path / "c.toml", "redis", {"url": sentinels.url, "wait_replicas": 1})
    loop = type("Counting", (Counting,), {"NAME": f"t-wait-{uuid.uuid4().hex[:8]}"})(config_file=config)
    for i in range(200):
        loop.add_task("count", i, task_name=f"t{i}")
    summary = await asyncio.wait_for(loop.serve(idle_exit=0.3), 60)
    assert summary.succeeded == 200 and sorted(loop.ran) == list(range(200))  # type: ignore[attr-defined]

    name = f"t-wait-{uuid.uuid4().hex[:8]}"
    q = RedisQueue(name, url=sentinels.url, wait_replicas=2, wait_timeout=0.2)  # one replica only
    await q.open()
    try:
        with caplog.at_level(logging.WARNING, logger="achihuo_mini"):
            assert await q.push([NewTask(b"x")]) == 1, "the write is on the primary: it counts, once"
            assert await q.push([NewTask(b"y")]) == 1
        assert (await q.stats()).ready == 2, "a write is never repeated for a missing replica (no duplicates)"
        assert "reached 1 of 2 replicas within 0.4 s" in caplog.text and q.replica_shortfalls == 2
        await q.clear("queue")
    finally:
        await q.close()
    with pytest.raises(ConfigError, match="not available on a Redis Cluster"):
        RedisQueue(name, url="redis+cluster://127.0.0.1:7000", wait_replicas=1)
