"""Statistics across all workers: counters kept per worker, published with heartbeats, summed in
the backend; the progress line, the final table, ``status``, and Prometheus ``/metrics``."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sqlite3
import subprocess
import sys
import urllib.request
import uuid
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from achihuo_mini import AsyncLoop, ConfigError
from achihuo_mini._stats import CUSTOM_MAX, HOSTS_TOP, Stats, structured
from achihuo_mini.backend import CounterStore
from achihuo_mini.testing import wait_until

from .conftest import SpiderFactory, _free_port, store_of, write_backend_config
from .test_examples import serve_in_thread
from .test_no_loss import FAST_LOOP

STATS_SPIDER = Path(__file__).parent / "procs" / "stats_spider.py"


# -- the counters themselves ----------------------------------------------------------------


def test_a_delta_never_loses_what_was_counted_while_it_was_sent() -> None:
    s = Stats()
    s.add("tasks/ok", 3)
    s.inc("items")
    first = s.delta()
    s.add("tasks/ok", 2)  # counted while ``first`` is on its way to the backend
    s.inc("items", 5)
    s.sent(first)
    assert s.delta() == {"tasks/ok": 2, "custom/items": 5}
    lost = s.delta()  # this one never arrives: not marked sent
    assert s.delta() == lost, "what was not sent is sent again"
    s.sent(lost)
    assert s.delta() == {}


def test_max_and_min_counters_are_sent_as_values() -> None:
    s = Stats()
    s.stamp()
    first = s.delta()
    assert first["max/last_seen"] == first["min/first_start"] > 0
    s.sent(first)
    s.counts["max/last_seen"] += 5000
    assert s.delta() == {"max/last_seen": first["max/last_seen"] + 5000}


def test_only_the_busiest_hosts_are_named() -> None:
    s = Stats()
    for i in range(50):
        for _ in range(i + 1):
            s.response(0.01, 200, 10, f"h{i}.example")
    delta = s.delta()
    named = {k for k in delta if k.startswith("http/host/") and k != "http/host/(other)"}
    assert named == {f"http/host/h{i}.example" for i in range(50 - HOSTS_TOP, 50)}
    assert sum(v for k, v in delta.items() if k.startswith("http/host/")) == sum(range(1, 51))


def test_a_spiders_own_counters_are_checked_and_bounded(caplog: pytest.LogCaptureFixture) -> None:
    s = Stats()
    s.inc("items")
    s.inc("items", 4)
    assert s["items"] == 5 and s.get("items") == 5 and s.get("nothing") == 0
    for bad_name in ("", 3, None, "x" * 500):
        with pytest.raises(TypeError):
            s.inc(bad_name)  # type: ignore[arg-type]
    for bad_n in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError):
            s.inc("items", bad_n)  # type: ignore[arg-type]
    for i in range(CUSTOM_MAX + 50):
        s.inc(f"n{i}")
    assert len([k for k in s.counts if k.startswith("custom/")]) == CUSTOM_MAX
    assert sum("not counted" in r.getMessage() for r in caplog.records) == 1, "one warning, not one per call"


def test_names_from_outside_are_bounded_per_kind() -> None:
    s = Stats()
    for i in range(1000):
        s.add_bounded("http/errors", f"Error{i}")
    kinds = [k for k in s.counts if k.startswith("http/errors/")]
    assert len(kinds) == 301 and s.counts["http/errors/(other)"] == 700


def test_structured_ignores_counters_no_worker_wrote() -> None:
    data = structured({"tasks/ok": 3, "custom/items": 2, "x": "nan", "y": 2**70, "http/status/404": 1})  # type: ignore[dict-item]
    assert data["tasks"]["ok"] == 3 and data["custom"] == {"items": 2} and data["http"]["status"] == {"404": 1}


def test_progress_interval_below_one_second_is_refused() -> None:
    class P(AsyncLoop):
        NAME = "progress-check"

    with pytest.raises(ConfigError, match=r"progress_interval.*1 s or more"):
        P(cache_backend="memory", progress_interval=0.5)
    P(cache_backend="memory", progress_interval=0)
    P(cache_backend="memory", progress_interval=1)


@pytest.mark.parametrize("address", ["9464", "localhost", "127.0.0.1:0", "127.0.0.1:70000", ":9464", "[::1]:x"])
def test_a_bad_metrics_address_is_a_config_error(address: str) -> None:
    class M(AsyncLoop):
        NAME = "metrics-check"

    with pytest.raises(ConfigError, match="HOST:PORT"):
        M(cache_backend="memory", metrics=address)


# -- in one process, on every builtin backend -----------------------------------------------


class Counting(AsyncLoop):
    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("progress_interval", 0)
        kwargs.setdefault("retry_delay", 0.01)
        super().__init__(**kwargs)

    async def count(self, n: int) -> None:
        self.stats.inc("items", n)


async def test_totals_outlive_the_workers_until_clear_stats(spiders: SpiderFactory) -> None:
    loop = spiders(Counting)
    for i in range(5):
        loop.add_task("count", i)
    await loop.serve(idle_exit=0)
    again = spiders.subclass(type(loop).__bases__[0], loop.name)(config_file=spiders.config)  # the same NAME
    again.add_task("count", 10)
    await again.serve(idle_exit=0)
    async with store_of(loop) as store:
        totals = structured(await store.counts() or {})
        assert totals["custom"] == {"items": 20} and totals["tasks"]["ok"] == 6
        assert totals["runs"] == {"started": 2, "finished": {"idle": 2}}
        assert totals["handlers"] == {"count": {"ok": 6}}
        await store.clear("stats")
        assert await store.counts() == {}


async def test_a_spider_may_keep_its_own_stats_attribute(memory_spiders: SpiderFactory) -> None:
    class Own(Counting):
        def __init__(self, **kwargs: Any) -> None:
            self.stats = {"mine": 0}  # before super().__init__(): still the spider's own
            super().__init__(**kwargs)

        async def count(self, n: int) -> None:
            self.stats["mine"] += n

    loop = memory_spiders(Own)
    loop.add_task("count", 3)
    summary = await loop.serve(idle_exit=0)
    assert loop.stats == {"mine": 3} and summary.succeeded == 1


# -- bad counters in a backend cost those counters only ----------------------------------------


async def test_bad_counters_in_redis_are_skipped_and_replaced(redis_url: str, tmp_path: Path) -> None:
    import redis.asyncio as redis_asyncio

    from achihuo_mini_backends.redis_backend import redis_key

    name = f"t-badstats-{uuid.uuid4().hex[:8]}"
    loop = type("Bad", (Counting,), {"NAME": name})(config_file=write_backend_config(
        tmp_path / "r.toml", "redis", {"url": redis_url}))  # fmt: skip
    client = redis_asyncio.from_url(redis_url)
    key = redis_key(name, "stats")
    try:
        await client.hset(key, mapping={"custom/items": "not a number", b"\xff\xfe": "3", "tasks/ok": "2"})
        loop.add_task("count", 4)
        summary = await loop.serve(idle_exit=0)
        assert summary.exit_code == 0
        async with store_of(loop) as store:
            counts = await store.counts()
        assert counts is not None and counts["custom/items"] == 4 and counts["tasks/ok"] == 3
        await client.delete(key)
        await client.set(key, "a string, not a hash")
        done = subprocess.run(
            [sys.executable, "-m", "achihuo_mini", "status", name, "--backend", "redis", "--config",
             str(tmp_path / "r.toml"), "--json"], capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["stats"]["tasks"]["ok"] == 0, "a stats key of the wrong type reads as empty"
    finally:
        await loop.clear_data("all")
        await client.delete(key)
        await client.aclose()


async def test_bad_counter_rows_in_sqlite_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    loop = type("Bad", (Counting,), {"NAME": "t-badrows"})(
        config_file=write_backend_config(tmp_path / "s.toml", "sqlite", {"path": path})
    )
    loop.add_task("count", 2)
    await loop.serve(idle_exit=0)
    with closing(sqlite3.connect(path)) as conn, conn:
        (ns,) = conn.execute("SELECT id FROM namespaces").fetchone()
        conn.execute("INSERT INTO counters VALUES (?, 'weird', 'text')", (ns,))
        conn.execute("INSERT INTO counters VALUES (?, X'FFFE', 1)", (ns,))
        conn.execute("INSERT INTO counters VALUES (?, 'float', 1.5)", (ns,))
    async with store_of(loop) as store:
        counts = await store.counts()
    assert counts is not None and counts["custom/items"] == 2
    assert not {"weird", "float"} & set(counts)


async def test_a_version_1_sqlite_file_gets_its_statistics_table(tmp_path: Path) -> None:
    from .test_polite_backends import _version_1

    path = tmp_path / "old.sqlite3"
    _version_1(path)  # as an earlier version wrote it, with the loop 'old-loop' in it
    loop = type("Old", (Counting,), {"NAME": "old-loop"})(
        config_file=write_backend_config(tmp_path / "s.toml", "sqlite", {"path": path})
    )
    loop.add_task("count", 2)
    summary = await loop.serve(idle_exit=0)
    assert summary.exit_code == 0
    with closing(sqlite3.connect(path)) as conn, conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    async with store_of(loop) as store:
        assert isinstance(store.raw_queue, CounterStore)
        assert (await store.counts() or {})["custom/items"] == 2


# -- a crawl with a master and a slave --------------------------------------------------------


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return str(resp.read().decode())


def _sample(text: str, family: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(family + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.processes
@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_a_crawl_shows_its_statistics_summed_over_a_master_and_a_slave(
    backend: str, backend_options_for: Any, tmp_path: Path
) -> None:
    name = f"t-stats-{uuid.uuid4().hex[:8]}"
    config = write_backend_config(tmp_path / "c.toml", backend, backend_options_for(backend),
                                  {**FAST_LOOP, "max_retries": 1, "concurrency": 4})  # fmt: skip
    env = {**os.environ, "SPIDER_NAME": name, "ACHIHUO_CONFIG": str(config), "SITE_URL": serve_in_thread(),
           "PAGES": "70", "BROKEN": "2", "SLEEP": "0.1"}  # fmt: skip
    ports = [_free_port(), _free_port()]
    logs = [tmp_path / "slave.log", tmp_path / "master.log"]
    procs = []
    for args, port, log in ((["-s"], ports[0], logs[0]), ([], ports[1], logs[1])):
        with open(log, "wb") as out:
            procs.append(subprocess.Popen(
                [sys.executable, str(STATS_SPIDER), "start", *args, "--idle-exit", "1", "--metrics",
                 f"127.0.0.1:{port}"], env=env, stdout=out, stderr=out))  # fmt: skip
        if not args:
            break
        await wait_until(lambda: asyncio.sleep(0, "registered as" in logs[0].read_text()), timeout=30)

    def status() -> dict[str, Any]:
        done = subprocess.run([sys.executable, str(STATS_SPIDER), "status", "--json"], env=env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)  # type: ignore[no-any-return]

    try:
        async def scraped_both() -> bool:
            try:
                texts = [_metrics(p) for p in ports]
            except OSError:
                return False
            return all(_sample(t, "achihuo_tasks_total", outcome="ok") > 0 for t in texts)

        await wait_until(scraped_both, timeout=60, describe=lambda: "\n".join(p.read_text() for p in logs))
        live = [_metrics(p) for p in ports]
        for text in live:
            assert f'loop="{name}"' in text and "achihuo_http_request_duration_seconds_bucket" in text
            assert "achihuo_queue_tasks{" in text and "achihuo_running_handlers{" in text
        assert {re.search(r'worker="(\w+)"', t).group(1) for t in live} == {"m1", "s1"}  # type: ignore[union-attr]
        for p in procs:
            assert await asyncio.to_thread(p.wait, 120) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    try:
        data = status()
        stats = data["stats"]
        assert stats["http"]["status"] == {"200": 60, "404": 10}, stats["http"]
        assert stats["custom"] == {"items": 120, "missing": 10}, "the handler's own counter, summed"
        assert stats["tasks"]["ok"] == 70 and stats["tasks"]["dead"] == 2 and stats["tasks"]["retried"] == 2
        assert stats["handlers"]["page"]["ok"] == 70 and stats["handlers"]["broken"]["dead"] == 2
        assert stats["http"]["requests"] == 70 and stats["http"]["bytes"] > 0
        assert stats["http"]["latency"]["count"] == 70 and stats["http"]["latency"]["p50"] > 0
        assert stats["http"]["hosts"] == {"127.0.0.1": 70}
        assert stats["runs"] == {"started": 2, "finished": {"idle": 2}}
        assert data["queue"]["dead"] == 2
        text = subprocess.run([sys.executable, str(STATS_SPIDER), "status"], env=env, capture_output=True,
                              text=True, timeout=60).stdout  # fmt: skip
        assert "status 200 x60, 404 x10" in text and "counted by the spider: items 120, missing 10" in text
        dead = subprocess.run([sys.executable, str(STATS_SPIDER), "dead"], env=env, capture_output=True,
                              text=True, timeout=60).stdout  # fmt: skip
        assert dead.count("LookupError: broken task") == 2
        worked = []
        for log in logs:
            out = log.read_text()
            table = out[out.index("stats of this worker:") :]
            ok = int(re.search(r"tasks/ok\s+(\d+)", table).group(1))  # type: ignore[union-attr]
            worked.append(ok)
            assert "custom/items" in table and "finish_reason" in table and "http/status/200" in table
        assert sum(worked) == 70 and min(worked) > 0, f"both workers crawled: {worked}"
    finally:
        subprocess.run([sys.executable, str(STATS_SPIDER), "clear", "--yes"], env=env, capture_output=True,
                       timeout=60)  # fmt: skip


@pytest.mark.processes
def test_metrics_on_an_address_taken_fails_at_start(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "SPIDER_NAME": f"t-m-{uuid.uuid4().hex[:6]}", "PAGES": "1"}
        done = subprocess.run(
            [sys.executable, str(STATS_SPIDER), "start", "--idle-exit", "0", "--metrics", f"127.0.0.1:{port}"],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert done.returncode == 1
    assert f"--metrics 127.0.0.1:{port}: cannot listen there" in done.stderr
    bad = subprocess.run([sys.executable, str(STATS_SPIDER), "start", "--metrics", "nowhere"], env=env,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 1 and "HOST:PORT" in bad.stderr and "Traceback" not in bad.stderr
