"""Error boundaries: a plugin that raises anything at all, or a background task that dies,
stops the loop loudly (its name in the log, exit code 1) and loses no task."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from achihuo_mini.backend import QueueStats
from achihuo_mini.plugins import registry
from achihuo_mini_backends.memory import drop_namespace

from .conftest import store_of
from .procs.faulty_plugin import FaultyPlugin, PlainPlugin, Waiter


@pytest.fixture
def faulty() -> Iterator[None]:
    registry.register_plugin(FaultyPlugin(), "faulty-plugin")
    try:
        yield
    finally:
        registry.unregister_plugin("faulty-plugin")


def _loop(tmp_path: Path, fail: str, **options: Any) -> Any:
    config = tmp_path / "faulty.toml"
    config.write_text(f'[queue]\nbackend = "faulty"\nfail = "{fail}"\n[done]\nbackend = "faulty"\nfail = "{fail}"\n')
    cls = type("Waiter", (Waiter,), {"NAME": f"faulty-{uuid.uuid4().hex[:8]}"})
    loop = cls(config_file=config, concurrency=5, heartbeat_interval=0.05, grace_period=0.2, **options)
    loop.gate = asyncio.Event()
    return loop


async def _stats(loop: Any) -> QueueStats:
    async with store_of(loop) as store:
        return await store.stats()


@pytest.mark.parametrize(("fail", "handler"), [("commit", "quick"), ("reserve", "quick"), ("heartbeat", "slow")])
async def test_a_plugin_raising_key_error_stops_the_loop_and_loses_nothing(
    faulty: None, tmp_path: Path, caplog: pytest.LogCaptureFixture, fail: str, handler: str
) -> None:
    loop = _loop(tmp_path, fail)
    try:
        for i in range(5):
            loop.add_task(handler, i)
        await loop.flush()
        summary = await asyncio.wait_for(loop.serve(), 30)  # no idle_exit: only the fault ends it
        assert summary.exit_code == 1
        assert f"'faulty-plugin' plugin's queue.{fail}() raised KeyError" in caplog.text
        assert f"'faulty-plugin' plugin's queue.{fail}() raised KeyError" in summary.reason
        stats = await _stats(loop)
        assert stats == QueueStats(ready=5, delayed=0, leased=0, dead=0), "every unacknowledged task is in the queue"
    finally:
        drop_namespace(loop.name)


async def test_a_dead_background_task_is_logged_with_its_traceback_and_stops_the_loop(
    memory_spiders: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a backend error at all: a bug in the committer itself must not leave the loop running unacknowledged."""
    from achihuo_mini import _worker

    async def broken(self: Any) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(_worker.Worker, "_committer", broken)
    loop = memory_spiders(Waiter, concurrency=2)
    loop.add_task("quick", 1)
    summary = await asyncio.wait_for(loop.serve(), 30)
    assert summary.exit_code == 1 and "committer died: ZeroDivisionError" in summary.reason
    record = next(r for r in caplog.records if "committer died" in r.getMessage())
    assert record.levelno == logging.ERROR and record.exc_info is not None, "logged with its traceback"
    assert (await _stats(loop)).active == 0, "the final writes still acknowledged the finished task"


SCRIPT = """
import sys
sys.path.insert(0, {procs!r})
from achihuo_mini.plugins import registry
from faulty_plugin import FaultyPlugin, Waiter
registry.register_plugin(FaultyPlugin(), "faulty-plugin")
Spider = type("Spider", (Waiter,), {{"NAME": "faulty-cli"}})
spider = Spider(config_file={config!r}, heartbeat_interval=0.05, grace_period=0.2)
spider.add_task("quick", 1)
spider.start()
"""


@pytest.mark.processes
def test_the_command_line_exits_1_when_a_plugin_breaks(tmp_path: Path) -> None:
    config = tmp_path / "faulty.toml"
    config.write_text('[queue]\nbackend = "faulty"\nfail = "commit"\n[done]\nbackend = "faulty"\nfail = "commit"\n')
    script = tmp_path / "spider.py"
    script.write_text(SCRIPT.format(procs=str(Path(__file__).parent / "procs"), config=str(config)))
    done = subprocess.run([sys.executable, str(script), "start"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "'faulty-plugin' plugin's queue.commit() raised KeyError" in done.stderr


async def test_a_queue_without_registry_or_notifier_serves_to_idle(tmp_path: Path) -> None:
    """Optional abilities are optional: no heartbeat to run is not a dead heartbeat."""
    registry.register_plugin(PlainPlugin(), "plain-plugin")
    cls = type("Waiter", (Waiter,), {"NAME": f"plain-{uuid.uuid4().hex[:8]}"})
    try:
        loop = cls(cache_backend="plain", heartbeat_interval=0.05)
        for i in range(20):
            loop.add_task("quick", i)
        await loop.flush()
        summary = await asyncio.wait_for(loop.serve(idle_exit=0.2), 30)
        assert summary.exit_code == 0 and summary.succeeded == 20 and summary.alias is None
    finally:
        registry.unregister_plugin("plain-plugin")
        drop_namespace(cls.NAME)
