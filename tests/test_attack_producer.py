"""Attacks on producing tasks: buffering, bulk adds, adds from threads.

Each test demonstrates one defect; see its docstring.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from achihuo_mini import AsyncLoop, Task
from achihuo_mini.codec import name_key
from achihuo_mini.testing import wait_until

from .conftest import SpiderFactory, store_of


class Pages(AsyncLoop):
    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("concurrency", 1)
        super().__init__(**kwargs)
        self.got: list[Any] = []

    async def page(self, label: Any) -> None:
        self.got.append(label)


async def test_buffering_never_changes_which_copy_of_a_unique_name_is_queued(spiders: SpiderFactory) -> None:
    """``add_task(x, repeat=False)`` then ``add_task(x, repeat=False, priority=True)``: written one by
    one (a feeder script, no event loop) the first is queued and the second skipped (x is pending).
    Buffered in the loop's outbox, ``Outbox.add`` (_outbox.py:48-53) moves the newer head task in
    front of the older one, so the backend sees the priority copy first: it is queued and the
    first add -- with its own arguments -- is dropped. "A speed-up never changes what gets queued"."""
    reference = spiders(Pages)
    buffered = type(reference)(config_file=spiders.config, concurrency=1)  # same NAME, same data

    def feeder() -> None:  # no event loop in this thread: each add is written before it returns
        reference.add_task("page", "first", task_name="x", repeat=False)
        reference.add_task("page", "second", task_name="x", repeat=False, priority=True)
        reference.close()

    await asyncio.to_thread(feeder)
    await reference.serve(idle_exit=0)
    assert reference.got == ["first"], "written one by one, the first add wins"

    buffered.add_task("page", "first", task_name="y", repeat=False)
    buffered.add_task("page", "second", task_name="y", repeat=False, priority=True)
    await buffered.flush()
    await buffered.serve(idle_exit=0)
    assert buffered.got == ["first"], (
        f"the buffered outbox queued {buffered.got}: the later (skippable) priority copy won over the first add"
    )


class Seeder(AsyncLoop):
    """run() adds its seeds with add_tasks from a generator that fails after 1500 seeds."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("concurrency", 8)
        super().__init__(**kwargs)

    def seeds(self) -> Iterator[Task]:
        for i in range(1500):
            yield Task("page", i, task_name=f"p{i}")
        raise ValueError("the seed file ends in garbage")

    async def run(self) -> None:
        await self.add_tasks(self.seeds())

    async def page(self, i: int) -> None:
        pass


async def test_add_tasks_from_a_failing_generator_keeps_everything_before_the_failure(
    memory_spiders: SpiderFactory,
) -> None:
    """"If run() raises, what it added is kept." With ``add_tasks`` and a generator that raises after
    1500 tasks, the first 1000 (a full BULK_CHUNK, routed) are kept and the next 500 -- already
    produced, checked and encoded -- vanish with the local ``chunk`` list (_producer.py add_many):
    no log line mentions them. Calling add_task 1500 times would have kept all 1500."""
    loop = memory_spiders(Seeder)
    summary = await loop.serve(seed=True, idle_exit=0)
    assert summary.exit_code == 1, "run() raised"
    async with store_of(loop) as store:
        kept = summary.succeeded + (await store.stats()).ready
    assert kept == 1500, f"only {kept} of the 1500 seeds run() produced were kept (ran or still queued)"


async def test_add_task_from_several_threads_writes_each_task_once(tmp_path: Path) -> None:
    """A feeder with a thread pool (no event loop in the threads): each add_task is "written before
    it returns". All threads share one ``BlockingWriter`` whose ``asyncio.Runner`` is not
    thread-safe (_producer.py BlockingWriter._run): a second thread gets ``RuntimeError: This
    event loop is already running`` -- yet its write was scheduled on the first thread's event
    loop and lands anyway. The caller is told the add failed when it succeeded (a retry
    duplicates it; a feeder that treats it as fatal stops)."""
    spiders = SpiderFactory("sqlite", {"path": tmp_path / "feed.sqlite3"}, tmp_path)
    loop = spiders(Pages)
    errors: list[str] = []
    start = threading.Barrier(4)

    def feed(k: int) -> None:
        start.wait()
        for i in range(50):
            try:
                loop.add_task("page", i, task_name=f"{k}-{i}")
            except Exception as exc:
                errors.append(repr(exc))

    threads = [threading.Thread(target=feed, args=(k,)) for k in range(4)]
    await asyncio.to_thread(lambda: ([t.start() for t in threads], [t.join() for t in threads]))
    await asyncio.to_thread(loop.close)
    async with store_of(loop) as store:
        ready = (await store.stats()).ready
    assert not errors, f"{len(errors)} of 200 adds raised (e.g. {errors[0]}) although {ready} of 200 tasks were queued"


class Recrawl(AsyncLoop):
    """run() marks a page done; a handler that runs *afterwards* (it waits for that) uncaches it."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("concurrency", 2)
        kwargs.setdefault("flush_interval", 5.0)
        super().__init__(**kwargs)
        self.marked = asyncio.Event()
        self.committed: list[str] = []

    async def run(self) -> None:
        self.add_task("refresh", "x")
        await self.flush()
        self.task_done("x")  # t1: the loop's outbox
        self.marked.set()
        await asyncio.Event().wait()  # a long seeding (a slow sitemap, a feed): cancelled by the stop

    async def refresh(self, name: str) -> None:
        await self.marked.wait()
        self.uncache_task(name)  # t2 > t1: "crawl x again"
        self.committed.append(name)


async def test_a_later_uncache_in_a_handler_wins_over_an_earlier_task_done(memory_spiders: SpiderFactory) -> None:
    """``task_done('x')`` in run() (loop outbox), *then* ``uncache_task('x')`` in a handler. The
    committer writes each round's handler commits first and the loop's outbox after them
    (_worker.py ``_write_batch``), so the older task_done is applied last: x ends up done, the
    uncache is lost, and every later ``add_task(x, repeat=False)`` is skipped -- the re-crawl
    silently never happens."""
    loop = memory_spiders(Recrawl)
    serving = asyncio.ensure_future(loop.serve())
    key = name_key("x")

    async def handler_committed() -> bool:
        async with store_of(loop) as store:
            return bool(loop.committed) and (await store.stats()).active == 0

    await wait_until(handler_committed, timeout=10)
    await loop.flush()  # the loop's outbox (task_done in run()) is written too
    async with store_of(loop) as store:
        (x_done,) = await store.done.contains([key])
    loop.stop()
    await asyncio.wait_for(serving, 30)
    assert not x_done, "x is in the done set although uncache_task('x') was the last call made for it"
