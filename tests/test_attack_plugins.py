"""Attacks on the error boundaries: a backend plugin that misbehaves without raising an Exception.

The plugin below is the builtin memory backend with one method made to misbehave, the way a
third-party plugin's bug would (registered in-process, as tests/procs/faulty_plugin.py does).
The loop must stop loudly (exit code 1, tasks back in the queue) or go on acknowledging --
never run on with nothing acknowledged, and never hang.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from achihuo_mini import AsyncLoop
from achihuo_mini.backend import Commit, QueueStats
from achihuo_mini.plugins import BackendSpec, Option, hookimpl, registry
from achihuo_mini_backends.memory import MemoryDoneSet, MemoryQueue, drop_namespace

from .conftest import store_of


class OddQueue(MemoryQueue):
    """The memory queue with one misbehaving method, chosen by the ``mode`` option."""

    def __init__(self, namespace: str, mode: str) -> None:
        super().__init__(namespace)
        self.mode = mode
        self.commits = 0

    async def commit(self, commits: Sequence[Commit]) -> int:
        self.commits += 1
        if self.mode == "commit-cancelled-once" and self.commits == 1:
            # what a driver does when an internal future of its connection was cancelled
            raise asyncio.CancelledError()
        if self.mode == "commit-hangs":
            await asyncio.Event().wait()  # a reply that never comes, no timeout in the driver
        return await super().commit(commits)

    async def heartbeat(self, worker: str, info: Any, ttl: float) -> Any:
        reply = await super().heartbeat(worker, info, ttl)
        if self.mode == "heartbeat-tuple" and isinstance(reply, list):
            return tuple(reply)  # a sequence of commands, just not a list
        return reply


class OddPlugin:
    @hookimpl
    def achihuo_register_backends(self, register: Any) -> None:
        register(
            BackendSpec(
                name="odd",
                scope="process",
                description="the memory backend with one misbehaving method",
                create_queue=lambda ns, opts: OddQueue(ns, opts["mode"]),
                create_done_set=lambda ns, opts: MemoryDoneSet(ns),
                options={"mode": Option(str, "", "what misbehaves")},
            )
        )


class Work(AsyncLoop):
    async def quick(self, i: int) -> None:
        pass

    async def slow(self, i: int) -> None:
        await asyncio.sleep(0.3)


@pytest.fixture
def odd() -> Iterator[None]:
    registry.register_plugin(OddPlugin(), "odd-plugin")
    try:
        yield
    finally:
        registry.unregister_plugin("odd-plugin")


def _loop(tmp_path: Path, mode: str, base: type = Work, **options: Any) -> Any:
    config = tmp_path / "odd.toml"
    config.write_text(f'[queue]\nbackend = "odd"\nmode = "{mode}"\n[done]\nbackend = "odd"\nmode = "{mode}"\n')
    cls = type(base.__name__, (base,), {"NAME": f"odd-{uuid.uuid4().hex[:8]}"})
    options.setdefault("progress_interval", 0)
    return cls(config_file=config, **options)


async def _acked_or_stopped(loop: Any, serving: asyncio.Task[Any], n: int, timeout: float) -> str:
    """Wait until the n tasks are acknowledged, or serve() ended; say which (or 'neither')."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if serving.done():
            return "stopped"
        async with store_of(loop) as store:
            if (await store.stats()).active == 0 and await store.done_count() == n:
                return "acked"
        await asyncio.sleep(0.05)
    return "neither"


class Marks(Work):
    async def quick(self, i: int) -> None:
        self.task_done(f"q{i}")

    async def slow(self, i: int) -> None:
        await asyncio.sleep(0.3)
        self.task_done(f"q{i}")


async def test_a_cancelled_error_raised_by_commit_is_a_fault_not_a_silent_death(odd: None, tmp_path: Path) -> None:
    """A plugin's commit raises ``CancelledError`` once (a BaseException: ``guard`` only converts
    ``Exception``, _store.py:87). It ends the committer task as *cancelled*, and the supervisor
    ignores cancelled tasks (_worker.py:182 ``if task.cancelled(): return``). From then on no
    commit is ever written: handlers finish, the dispatcher reserves and runs every task, nothing
    is acknowledged, no error is logged, and the loop never exits -- exactly what the README says
    cannot happen ("it never runs on acknowledging nothing")."""
    loop = _loop(tmp_path, "commit-cancelled-once", Marks, concurrency=4, heartbeat_interval=0.1)
    try:
        for i in range(10):
            loop.add_task("quick", i)
        await loop.flush()
        serving = asyncio.ensure_future(loop.serve(idle_exit=0.2))
        outcome = await _acked_or_stopped(loop, serving, 10, timeout=15)
        before = await _stats(loop), await _done(loop)
        loop.stop()
        summary = await asyncio.wait_for(serving, 60)
        assert outcome != "neither", (
            f"after 15 s nothing was acknowledged and the loop still ran (queue, done names: {before}); "
            f"it ended only when stopped from outside: {summary}"
        )
    finally:
        drop_namespace(loop.name)


async def _done(loop: Any) -> int:
    async with store_of(loop) as store:
        return await store.done_count()


async def _stats(loop: Any) -> QueueStats:
    async with store_of(loop) as store:
        return await store.stats()


async def test_a_heartbeat_answering_garbage_is_a_fault_not_a_death_sentence(odd: None, tmp_path: Path) -> None:
    """``heartbeat`` answers its commands as a tuple instead of a list. ``Presence._beat``
    (_presence.py:106) reads anything but a list as "declared dead": at every heartbeat it
    cancels all running handlers (reason 'lost', their work discarded), drops their leases and
    registers a new incarnation -- with no error and no stop. A handler that takes longer than
    one heartbeat interval never completes: the loop runs for ever acknowledging nothing."""
    loop = _loop(tmp_path, "heartbeat-tuple", Marks, concurrency=4, heartbeat_interval=0.1, lease_timeout=1.0)
    try:
        for i in range(4):
            loop.add_task("slow", i)
        await loop.flush()
        serving = asyncio.ensure_future(loop.serve(idle_exit=0.2))
        outcome = await _acked_or_stopped(loop, serving, 4, timeout=15)
        before = await _stats(loop), await _done(loop)
        loop.stop()
        summary = await asyncio.wait_for(serving, 60)
        assert outcome != "neither", (
            f"after 15 s none of 4 handlers of 0.3 s was acknowledged and the loop still ran "
            f"(queue, done names: {before}); it ended only when stopped from outside: {summary}"
        )
    finally:
        drop_namespace(loop.name)


async def test_a_graceful_stop_ends_although_commit_never_answers(
    odd: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plugin's commit never answers (a driver without a read timeout). A graceful stop gives
    the committer BACKGROUND_WAIT (15 s) and cancels it, then ``_final_writes`` calls the same
    commit again with no deadline at all (FINAL_WRITES applies only to ``BackendUnavailable``
    *errors*, _worker.py ``_final_writes``): the stop never ends, the process never exits, and a
    second interrupt does not help (it only skips the grace period)."""
    from achihuo_mini import _worker

    monkeypatch.setattr(_worker, "BACKGROUND_WAIT", 2.0)  # shorter waits, same code path
    monkeypatch.setattr(_worker, "FINAL_WRITES", 1.0)
    loop = _loop(tmp_path, "commit-hangs", concurrency=2, heartbeat_interval=0.1, grace_period=0.5)
    try:
        loop.add_task("quick", 1)
        await loop.flush()
        serving = asyncio.ensure_future(loop.serve())
        async def committing() -> bool:
            async with store_of(loop) as store:
                return (await store.stats()).leased == 1 and not serving.done()
        from achihuo_mini.testing import wait_until

        await wait_until(committing, timeout=10)
        loop.stop()
        done, _ = await asyncio.wait([serving], timeout=45)
        assert done, "45 s after stop() the loop had still not stopped (grace 0.5 s + 2 s + 2 s + 1 s)"
    finally:
        if not serving.done():
            serving.cancel()
            await asyncio.wait([serving], timeout=30)
        drop_namespace(loop.name)
