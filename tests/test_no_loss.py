"""No task is lost: graceful stops, SIGKILL, chaos, Redis restarts — with real processes and signals.

Every test runs a real spider (tests/procs/crash_spider.py) in OS processes against SQLite
and Redis, then checks the backend itself: every expected name is in the done set and
nothing is left ready, delayed or leased.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from achihuo_mini.backend import DoneSetBackend, QueueBackend, QueueStats, WorkerRegistry
from achihuo_mini.codec import name_key
from achihuo_mini.config import build_backend_options
from achihuo_mini.plugins import registry
from achihuo_mini.testing import wait_until

from .conftest import RedisServer, write_backend_config

SPIDER = Path(__file__).parent / "procs" / "crash_spider.py"
FAST_LOOP = {
    "lease_timeout": 2.0,
    "heartbeat_interval": 0.25,
    "grace_period": 2.0,
    "retry_delay": 0.05,
    "progress_interval": 0,
}

pytestmark = pytest.mark.processes


class Crawl:
    """One spider NAME on one backend; starts worker processes and inspects the backend."""

    spider: Path = SPIDER  # the spider file the workers run

    def __init__(self, backend: str, options: dict[str, Any], tmp_path: Path, **loop: Any) -> None:
        self.backend = backend
        self.options = options
        self.tmp = tmp_path
        self.name = f"noloss-{uuid.uuid4().hex[:8]}"
        self.config = write_backend_config(tmp_path / "crawl.toml", backend, options, {**FAST_LOOP, **loop})
        self.exec_dir = tmp_path / "exec"
        self.exec_dir.mkdir()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.log_of: dict[int, Path] = {}
        self.queue: QueueBackend
        self.done: DoneSetBackend

    async def __aenter__(self) -> Crawl:
        spec = registry.get(self.backend)
        opts = build_backend_options(spec, self.options, source="test")
        assert spec.create_queue and spec.create_done_set
        self.queue = spec.create_queue(self.name, dict(opts))
        self.done = spec.create_done_set(self.name, dict(opts))
        await self.queue.open()
        await self.done.open()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if isinstance(self.queue, WorkerRegistry):
            for w in await self.queue.workers():
                await self.queue.unregister(w.worker)
        await self.queue.clear("queue")
        await self.queue.clear("dead")
        await self.done.clear()
        await self.queue.close()
        await self.done.close()

    def start(self, *args: str, **env: Any) -> subprocess.Popen[bytes]:
        log_path = self.tmp / f"worker-{len(self.procs)}.log"
        log = open(log_path, "wb")
        full_env = {
            **os.environ,
            "SPIDER_NAME": self.name,
            "ACHIHUO_CONFIG": str(self.config),
            "EXEC_DIR": str(self.exec_dir),
            **{k: str(v) for k, v in env.items()},
        }
        cmd = [sys.executable, str(self.spider), "start", *args]
        proc = subprocess.Popen(cmd, env=full_env, stdout=log, stderr=log)
        log.close()
        self.procs.append(proc)
        self.log_of[proc.pid] = log_path
        return proc

    async def registered(self, proc: subprocess.Popen[bytes]) -> bool:
        """The worker is up: it registered (and so handles SIGTERM gracefully)."""
        return "registered as" in self.log_of[proc.pid].read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.tmp.glob("worker-*.log")))

    def executions(self) -> collections.Counter[int]:
        counts: collections.Counter[int] = collections.Counter()
        for f in self.exec_dir.iterdir():
            counts.update(int(line) for line in f.read_text().split())
        return counts

    async def done_count(self, names: list[str]) -> int:
        return sum(await self.done.contains([name_key(n) for n in names]))

    async def wait_exit(self, proc: subprocess.Popen[bytes], timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            if time.monotonic() > deadline:
                pytest.fail(f"worker {proc.pid} did not exit within {timeout} s\n{self.logs()[-5000:]}")
            await asyncio.sleep(0.05)
        return proc.returncode

    async def assert_all_done(self, names: list[str]) -> None:
        missing = [
            n for n, d in zip(names, await self.done.contains([name_key(n) for n in names]), strict=True) if not d
        ]
        assert not missing, f"{len(missing)} names never done, e.g. {missing[:5]}\n{self.logs()[-5000:]}"
        assert await self.queue.stats() == QueueStats(0, 0, 0, 0)


@pytest.fixture(params=["sqlite", "redis"])
async def crawl(request: pytest.FixtureRequest, backend_options_for: Any, tmp_path: Path) -> AsyncIterator[Any]:
    backend = request.param

    def make(**loop: Any) -> Crawl:
        return Crawl(backend, backend_options_for(backend), tmp_path, **loop)

    yield make


def names(n: int) -> list[str]:
    return [f"t{i}" for i in range(n)]


async def test_sigterm_mid_run_exits_0_and_a_restart_finishes(crawl: Any) -> None:
    async with crawl(concurrency=20) as c:
        # every 7th task hangs on its first attempt: the stop must cancel and release it
        first = c.start(TASKS=500, SLEEP=0.1, HANG_FIRST=120, HANG_MOD=7)
        await wait_until(lambda: _more_than(c, 60), timeout=60)
        sent = time.monotonic()
        first.send_signal(signal.SIGTERM)
        code = await c.wait_exit(first, timeout=30)
        took = time.monotonic() - sent
        assert code == 0, c.logs()
        assert took < 2.0 + 2.0 + 3.0, f"exit took {took:.1f} s: grace 2 s + 2 s release wait + slack"
        stats = await c.queue.stats()
        assert stats.leased == 0, "a graceful stop releases every lease"
        assert "released" in c.logs()
        second = c.start("--idle-exit", "0.5", TASKS=500)
        assert await c.wait_exit(second, timeout=120) == 0, c.logs()
        await c.assert_all_done(names(500))


async def _more_than(c: Crawl, n: int) -> bool:
    return sum(c.executions().values()) > n


async def test_sigkill_one_of_two_workers(crawl: Any) -> None:
    async with crawl(concurrency=10) as c:
        master = c.start("--idle-exit", "1", TASKS=300, SLEEP=0.1)
        await wait_until(lambda: _stats_ready(c), timeout=60)
        victim = c.start("-s", SLEEP=0.1)
        victim_log = c.exec_dir / f"exec-{victim.pid}.log"
        await wait_until(lambda: _file_lines(victim_log, 15), timeout=60)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        assert await c.wait_exit(master, timeout=120) == 0, c.logs()
        await c.assert_all_done(names(300))
        assert "recovered" in c.logs()
        if isinstance(c.queue, WorkerRegistry):
            assert await c.queue.workers() == [], "the dead worker was unregistered by recovery"


async def _stats_ready(c: Crawl) -> bool:
    return (await c.queue.stats()).ready > 0


async def _file_lines(path: Path, n: int) -> bool:
    return path.exists() and len(path.read_text().split()) >= n


async def test_chaos_sigkill_random_workers(crawl: Any) -> None:
    total = 2000
    async with crawl(concurrency=20) as c:
        env = {"TASKS": total // 2, "CHILDREN": 1, "SLEEP": 0.2}
        roles = ["master", "slave", "slave"]
        workers = [c.start(**env)]
        await wait_until(lambda: _stats_ready(c), timeout=60)
        workers += [c.start("-s", **env), c.start("-s", **env)]
        rng = random.Random(7)
        kills = 0
        while kills < 10:
            await asyncio.sleep(rng.uniform(0.2, 0.6))  # chaos timing, not synchronisation
            i = rng.randrange(3)
            workers[i].send_signal(signal.SIGKILL)
            workers[i].wait()
            kills += 1
            workers[i] = c.start(*([] if roles[i] == "master" else ["-s"]), **env)
        for i in range(len(roles)):  # stop the last incarnations gracefully
            await wait_until(lambda: c.registered(workers[i]), timeout=30, describe=lambda: c.logs()[-8000:])  # noqa: B023
            workers[i].send_signal(signal.SIGTERM)
            assert await c.wait_exit(workers[i], timeout=30) == 0, c.logs()
        final = c.start("--idle-exit", "1", **env)
        assert await c.wait_exit(final, timeout=180) == 0, c.logs()
        await c.assert_all_done(names(total))
        runs = c.executions()
        assert set(runs) == set(range(total))
        repeated = sum(1 for n in runs.values() if n > 1)
        print(f"\nchaos on {c.backend}: {kills} SIGKILLs, {total} tasks, {repeated} ran more than once")


async def test_children_survive_sigkill_right_after_the_handler(crawl: Any) -> None:
    async with crawl(concurrency=1) as c:
        first = c.start(TASKS=10, CHILDREN=3, KILL_AFTER=4)
        code = await c.wait_exit(first, timeout=60)
        assert code == -signal.SIGKILL
        second = c.start("--idle-exit", "0.5", TASKS=10, CHILDREN=3)
        assert await c.wait_exit(second, timeout=60) == 0, c.logs()
        await c.assert_all_done(names(10 + 10 * 3))


async def test_redis_restart_mid_run(tmp_path: Path) -> None:
    data = tmp_path / "redis-data"
    data.mkdir()
    server = RedisServer(data, ("--appendonly", "yes", "--appendfsync", "always")).start()
    try:
        async with Crawl("redis", {"url": server.url}, tmp_path, concurrency=10) as c:
            durable = getattr(c.queue, "durability", None)
            assert durable == "always", f"the test server persists every write, the backend says {durable!r}"
            worker = c.start("--idle-exit", "1", TASKS=400, SLEEP=0.05)
            await wait_until(lambda: _more_than(c, 100), timeout=60)
            server.stop()
            stopped_at = time.monotonic()
            await wait_until(lambda: _log_says(c, "unreachable"), timeout=30)
            assert worker.poll() is None, "an outage does not kill the worker"
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - stopped_at)))  # stay down a while
            server.start()
            assert await c.wait_exit(worker, timeout=120) == 0, c.logs()
            assert "reachable again" in c.logs()
            await c.assert_all_done(names(400))
    finally:
        server.stop()


async def _log_says(c: Crawl, text: str) -> bool:
    return text in c.logs()


async def test_second_sigint_skips_the_grace_period(crawl: Any) -> None:
    async with crawl(concurrency=5, grace_period=60) as c:
        worker = c.start(TASKS=50, HANG_FIRST=120, HANG_MOD=1)  # every first attempt hangs
        await wait_until(lambda: _more_than(c, 4), timeout=60)
        worker.send_signal(signal.SIGINT)
        await wait_until(lambda: _log_says(c, "get 60.0 s to finish"), timeout=30)
        sent = time.monotonic()
        worker.send_signal(signal.SIGINT)
        assert await c.wait_exit(worker, timeout=30) == 0, c.logs()
        assert time.monotonic() - sent < 10, "the second interrupt does not wait for the 60 s grace period"
        assert "second interrupt" in c.logs()
        stats = await c.queue.stats()
        assert stats.leased == 0 and stats.ready == 50, "the cancelled tasks were released, not lost"
