"""No task lost, in the seams of the loop: self-cancelling handlers, rolling deploys, stops
during an outage, long pauses, stray leases, peers that advertise impossible handlers."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from achihuo_mini import AsyncLoop
from achihuo_mini import _worker as worker_module
from achihuo_mini._spill import spill_path
from achihuo_mini.backend import NewTask
from achihuo_mini.codec import encode_task
from achihuo_mini.testing import wait_until

from .conftest import RedisServer, SpiderFactory, store_of, write_backend_config
from .test_no_loss import SPIDER, Crawl


class Recorder(AsyncLoop):
    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("retry_delay", 0.01)
        kwargs.setdefault("progress_interval", 0)
        super().__init__(**kwargs)
        self.ran: list[str] = []

    async def cancelled_inside(self) -> None:
        """Awaits a future that something else cancelled: CancelledError, with nobody cancelling *this* task."""
        self.ran.append("cancelled_inside")
        future = asyncio.get_running_loop().create_future()
        future.cancel()
        await future

    async def h(self, label: str) -> None:
        self.ran.append(label)


async def test_a_handler_raising_cancelled_error_itself_fails_and_is_buried(spiders: SpiderFactory) -> None:
    """It used to go back to the queue head without spending a retry: a busy loop for ever."""
    loop = spiders(Recorder, max_retries=2)
    loop.add_task("cancelled_inside", task_name="c")
    summary = await asyncio.wait_for(loop.serve(idle_exit=0), 30)
    assert loop.ran == ["cancelled_inside"] * 3, "one try and two retries, then a dead letter"
    assert summary.buried == 1 and summary.failed == 3 and summary.released == 0
    async with store_of(loop) as store:
        (letter,) = await store.dead_letters(10)
    assert "CancelledError" in letter.error


async def test_a_worker_lacking_a_handler_does_not_hoard_the_queue(spiders: SpiderFactory) -> None:
    """Rolling deploy: the old worker holds back tasks it cannot run, counted against its
    concurrency, and they go back with a delay (not to the head), so the new worker gets them."""

    class Old(Recorder):
        pass

    class New(Recorder):
        async def v2(self, i: int) -> None:
            self.ran.append(f"v2-{i}")
            await asyncio.sleep(0.005)

    name = spiders.subclass(Old).NAME
    fast = {"config_file": spiders.config, "heartbeat_interval": 0.05, "concurrency": 4}
    old = type("Old", (Old,), {"NAME": name})(**fast)
    new = type("New", (New,), {"NAME": name})(**fast)
    for i in range(60):
        new.add_task("v2", i)
    await new.flush()
    new_serving = asyncio.ensure_future(new.serve(slave=True, idle_exit=0.2))
    await wait_until(lambda: _registered(new), timeout=30)  # a live peer advertises v2 from now on
    old_serving = asyncio.ensure_future(old.serve(slave=True))
    most_leased = 0
    async with store_of(new) as store:
        while not new_serving.done():
            most_leased = max(most_leased, (await store.stats()).leased)
            await asyncio.sleep(0.005)
    await asyncio.wait_for(new_serving, 60)
    old.stop()
    old_summary = await asyncio.wait_for(old_serving, 30)
    assert sorted(new.ran) == sorted(f"v2-{i}" for i in range(60))
    assert old_summary.buried == 0 and old_summary.exit_code == 0
    assert most_leased <= 8, f"{most_leased} leases at once: the old worker reserved past its concurrency"


async def test_handlers_no_loop_can_have_are_buried_at_once_whatever_a_peer_says(spiders: SpiderFactory) -> None:
    loop = spiders(Recorder)
    async with store_of(loop) as store:
        reg = store.registry
        if reg is None:
            pytest.skip("the memory backend has no cross-process peers")  # pragma: no cover
        await reg.register("fake-peer", "slave", {"handlers": ["_x", "stop", "run"]}, 3600)
        await store.queue.push([NewTask(encode_task(h, h, [])) for h in ("_x", "stop", "run")])
        summary = await asyncio.wait_for(loop.serve(idle_exit=0), 30)
        assert summary.buried == 3 and not loop.ran
        letters = await store.dead_letters(10)
        assert all("no loop can have" in letter.error for letter in letters)
        await reg.unregister("fake-peer")


async def test_stray_leases_are_released_at_the_next_heartbeat(spiders: SpiderFactory) -> None:
    """A lease the backend says this worker holds, but it never saw (a backend that restored old
    data, a lost reply), goes back to the queue at the next heartbeat instead of staying until exit."""

    class Gate(Recorder):
        gate = asyncio.Event()

        async def wait(self) -> None:
            await self.gate.wait()

    loop = spiders(Gate, heartbeat_interval=0.05, concurrency=1)
    Gate.gate = asyncio.Event()
    loop.add_task("wait")
    serving = asyncio.ensure_future(loop.serve())
    async with store_of(loop) as store:
        assert store.registry is not None
        await wait_until(lambda: _leased(store, 1), timeout=30)  # its one slot is taken: it reserves nothing
        (me,) = [w for w in await store.registry.workers() if w.alias == loop.alias]
        await store.queue.push([NewTask(encode_task("h", "stray", ["stray"]))])
        assert len(await store.queue.reserve(me.worker, 1)) == 1  # held under the loop's own worker id
        await wait_until(lambda: _ready(store, 1), timeout=30)  # given back by its heartbeat
        Gate.gate.set()
        await wait_until(lambda: _ran(loop, "stray"), timeout=30)
    loop.stop()
    summary = await asyncio.wait_for(serving, 30)
    assert summary.exit_code == 0 and loop.ran == ["stray"]


async def _leased(store: Any, n: int) -> bool:
    return bool((await store.stats()).leased == n)


async def _ready(store: Any, n: int) -> bool:
    return bool((await store.stats()).ready == n)


async def _ran(loop: Recorder, label: str) -> bool:
    return label in loop.ran


class Seeder(Recorder):
    gate: asyncio.Event
    seeded: asyncio.Event

    async def run(self) -> None:
        await self.gate.wait()  # the test takes the backend away first
        for i in range(5):
            self.add_task("h", f"seed-{i}", task_name=f"seed-{i}", repeat=False)
        self.task_done("marked-in-run")
        self.seeded.set()


async def test_writes_buffered_at_a_stop_during_an_outage_are_spilled_and_replayed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(worker_module, "FINAL_WRITES", 0.5)
    server = RedisServer().start()
    try:
        config = write_backend_config(tmp_path / "r.toml", "redis", {"url": server.url, "connect_timeout": 1.0,
                                                                     "socket_timeout": 1.0})  # fmt: skip
        cls = type("Seeder", (Seeder,), {"NAME": f"spill-{uuid.uuid4().hex[:8]}"})
        loop = cls(config_file=config, heartbeat_interval=0.1, grace_period=0.1)
        loop.gate, loop.seeded = asyncio.Event(), asyncio.Event()
        serving = asyncio.ensure_future(loop.serve())
        await wait_until(lambda: _registered(loop), timeout=30)
        server.stop()  # the backend goes away ...
        loop.gate.set()  # ... and only then does run() add its tasks
        await asyncio.wait_for(loop.seeded.wait(), 30)
        loop.stop()
        summary = await asyncio.wait_for(serving, 60)
        assert summary.exit_code == 1
        path = spill_path(loop.name)
        assert path.exists() and "kept 6 writes" in caplog.text and str(path) in caplog.text
        assert oct(path.stat().st_mode & 0o777) == oct(0o600) and oct(path.parent.stat().st_mode & 0o777) == oct(0o700)
        server.start()  # back (empty: it keeps nothing); the next start replays the spill file
        again = cls(config_file=config, heartbeat_interval=0.1)
        again.gate, again.seeded = asyncio.Event(), asyncio.Event()
        again.gate.set()
        summary = await asyncio.wait_for(again.serve(seed=False, idle_exit=0), 60)
        assert sorted(again.ran) == [f"seed-{i}" for i in range(5)]
        assert not path.exists() and "replayed 6 writes" in caplog.text
        async with store_of(again) as store:
            assert await store.done_count() == 1, "task_done made in run() arrived too"
    finally:
        server.remove()


async def _registered(loop: AsyncLoop) -> bool:
    return loop.alias is not None


@pytest.mark.processes
@pytest.mark.parametrize("stop_while_blocked", [False, True], ids=["stop-after", "stop-while-blocked"])
@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_a_worker_blocked_past_the_lease_timeout_re_registers_once_and_still_stops(
    backend: str, stop_while_blocked: bool, backend_options_for: Any, tmp_path: Path
) -> None:
    """The event loop blocked 3 s with a 2 s lease timeout: the worker unregisters its old
    incarnation and registers anew (status shows it once), and a stop -- also one sent while it
    was blocked, to the old incarnation -- reaches it; "stopped" is printed only once it exited."""
    async with Crawl(backend, backend_options_for(backend), tmp_path) as c:
        proc = c.start(TASKS=3, BLOCK="0:3")
        await wait_until(lambda: c.registered(proc), timeout=30)
        await wait_until(lambda: _executed(c, 0), timeout=30)  # task 0 is blocking the process now
        if not stop_while_blocked:
            await wait_until(lambda: _logged(c, "could not heartbeat for the lease timeout"), timeout=30)
            workers = await c.queue.workers()  # type: ignore[attr-defined]
            assert [w.alias for w in workers] == ["m1"], "the old incarnation is gone: the process is listed once"
        env = {**os.environ, "SPIDER_NAME": c.name, "ACHIHUO_CONFIG": str(c.config)}
        stop = await asyncio.create_subprocess_exec(
            sys.executable, str(SPIDER), "stop", "m1", "--timeout", "60", env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(stop.communicate(), 90)
        assert stop.returncode == 0, err.decode()
        assert "m1: stopped" in out.decode()
        assert proc.poll() is not None, "'stopped' was printed while the process was still running"
        assert proc.returncode == 0
        assert "could not heartbeat for the lease timeout" in c.logs()
        assert not await c.queue.workers()  # type: ignore[attr-defined]


async def _executed(c: Crawl, i: int) -> bool:
    return c.executions()[i] >= 1


async def _logged(c: Crawl, text: str) -> bool:
    return text in c.logs()


@pytest.mark.processes
@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_workers_started_at_the_same_moment_all_come_up(
    backend: str, backend_options_for: Any, tmp_path: Path
) -> None:
    """A master and five slaves started together on one loop: every one registers, they claim
    distinct aliases in one atomic step each, and the crawl finishes. (A fresh SQLite file
    opened by many processes at once: tests/test_sqlite_startup.py.)"""
    async with Crawl(backend, backend_options_for(backend), tmp_path) as c:
        env = {"TASKS": 60, "SLEEP": 0.01}
        procs = [c.start(**env)] + [c.start("-s", **env) for _ in range(5)]
        for proc in procs:
            await wait_until(lambda: c.registered(proc), timeout=60, describe=lambda: c.logs()[-8000:])  # noqa: B023
        aliases = sorted(w.alias for w in await c.queue.workers())  # type: ignore[attr-defined]
        assert aliases == ["m1", "s1", "s2", "s3", "s4", "s5"]
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            assert await c.wait_exit(proc, timeout=30) == 0, c.logs()[-5000:]
        final = c.start("--idle-exit", "0.5", **env)
        assert await c.wait_exit(final, timeout=60) == 0, c.logs()[-5000:]
        await c.assert_all_done([f"t{i}" for i in range(60)])
