"""The task loop on every backend: concurrency, priority, dedup, children, stop, failures."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from achihuo_mini import AsyncLoop, Item, Retry, Task
from achihuo_mini.backend import NewTask
from achihuo_mini.codec import decode_task, encode_task, name_key

from .conftest import SpiderFactory, store_of


class Recorder(AsyncLoop):
    """Records what ran; ``h`` is a no-op handler that marks its name done."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("concurrency", 4)
        super().__init__(**kwargs)
        self.ran: list[Any] = []
        self.running = 0
        self.peak = 0

    async def h(self, value: Any, name: str | None = None) -> None:
        self.ran.append(value)
        if name is not None:
            self.task_done(name)


async def test_concurrency_is_never_exceeded(spiders: SpiderFactory) -> None:
    class Busy(Recorder):
        async def work(self, i: int) -> None:
            self.running += 1
            self.peak = max(self.peak, self.running)
            for _ in range(3):
                await asyncio.sleep(0)  # interleave with the others without real time passing
            await asyncio.sleep(0.001)
            self.running -= 1
            self.ran.append(i)

    loop = spiders(Busy, concurrency=7)
    for i in range(150):
        loop.add_task("work", i)
    summary = await loop.serve(idle_exit=0)
    assert sorted(loop.ran) == list(range(150))
    assert loop.peak == 7, f"peak concurrency {loop.peak}, expected exactly the limit 7"
    assert summary.succeeded == 150 and summary.exit_code == 0


async def test_priority_tasks_run_first(spiders: SpiderFactory) -> None:
    loop = spiders(Recorder, concurrency=1)
    for i in range(5):
        loop.add_task("h", f"plain-{i}")
    loop.add_task("h", "urgent-1", priority=True)
    loop.add_task("h", "urgent-2", priority=1)
    await loop.serve(idle_exit=0)
    assert loop.ran[:2] == ["urgent-2", "urgent-1"], "the newest priority task runs first"
    assert loop.ran[2:] == [f"plain-{i}" for i in range(5)]


async def test_repeat_false_skips_done_and_pending(spiders: SpiderFactory) -> None:
    loop = spiders(Recorder, concurrency=2)
    loop.add_task("h", "first", "a", task_name="a", repeat=False)
    loop.add_task("h", "pending-dup", "a", task_name="a", repeat=False)  # skipped: pending
    loop.add_task("h", "repeat-dup", "a", task_name="a")  # repeat=True: always added
    await loop.serve(idle_exit=0)
    assert sorted(loop.ran) == ["first", "repeat-dup"]
    loop.ran.clear()
    loop.add_task("h", "done-dup", task_name="a", repeat=False)  # skipped: done
    loop.add_task("h", "b", task_name="b", repeat=False)
    await loop.serve(idle_exit=0)
    assert loop.ran == ["b"]


async def test_uncache_makes_name_addable_again(spiders: SpiderFactory) -> None:
    loop = spiders(Recorder)
    loop.add_task("h", "one", "x", task_name="x", repeat=False)
    await loop.serve(idle_exit=0)
    loop.add_task("h", "blocked", task_name="x", repeat=False)
    await loop.serve(idle_exit=0)
    assert loop.ran == ["one"]
    loop.uncache_task("x", "never-done")
    loop.add_task("h", "again", task_name="x", repeat=False)
    await loop.serve(idle_exit=0)
    assert loop.ran == ["one", "again"]


async def test_unnamed_tasks_are_never_deduplicated(spiders: SpiderFactory) -> None:
    loop = spiders(Recorder)
    for _ in range(3):
        loop.add_task("h", "same", repeat=False)
    await loop.serve(idle_exit=0)
    assert loop.ran == ["same"] * 3


async def test_task_added_from_handler_runs(spiders: SpiderFactory) -> None:
    class Tree(Recorder):
        async def node(self, depth: int, path: str) -> None:
            self.ran.append(path)
            if depth < 3:
                for child in "ab":
                    self.add_task("node", depth + 1, path + child, task_name=path + child, repeat=False)
                self.add_task("node", depth + 1, path + "a", task_name=path + "a", repeat=False)  # a duplicate
            self.task_done(path)

    loop = spiders(Tree)
    loop.add_task("node", 0, "r", task_name="r")
    summary = await loop.serve(idle_exit=0)
    assert len(loop.ran) == 15 and len(set(loop.ran)) == 15
    assert summary.succeeded == 15


async def test_run_seeds_and_master_consumes(spiders: SpiderFactory) -> None:
    class Seeded(Recorder):
        async def run(self) -> None:
            for i in range(30):
                self.add_task("h", i, f"n{i}", task_name=f"n{i}", repeat=False)

    loop = spiders(Seeded)
    await loop.serve(idle_exit=0)
    assert sorted(loop.ran) == list(range(30))
    second = await loop.serve(idle_exit=0)  # run() again: every seed is done, nothing re-runs
    assert sorted(loop.ran) == list(range(30)) and second.succeeded == 0
    slave = await loop.serve(slave=True, idle_exit=0)
    assert slave.alias is None or slave.alias.startswith("s")


async def test_stop_ends_the_loop(spiders: SpiderFactory) -> None:
    class Stopper(Recorder):
        async def h(self, value: Any, name: str | None = None) -> None:
            self.ran.append(value)
            if value == "stop-now":
                self.stop()

    loop = spiders(Stopper, concurrency=1)
    loop.add_task("h", "stop-now")
    for i in range(20):
        loop.add_task("h", i)
    summary = await asyncio.wait_for(loop.serve(), timeout=30)  # no idle_exit: only stop() ends it
    assert loop.ran[0] == "stop-now"
    assert summary.exit_code == 0
    assert summary.succeeded == len(loop.ran)
    rest = spiders.subclass(Recorder, loop.name)(config_file=spiders.config)
    await rest.serve(idle_exit=0)
    assert sorted(loop.ran[1:] + rest.ran) == list(range(20)), "what the stop left in the queue runs later"


async def test_stop_from_outside_while_idle(spiders: SpiderFactory) -> None:
    loop = spiders(Recorder)
    serving = asyncio.ensure_future(loop.serve())
    while loop.alias is None and not serving.done():
        await asyncio.sleep(0.01)
    loop.stop()
    summary = await asyncio.wait_for(serving, timeout=30)
    assert summary.exit_code == 0


async def test_items_round_trip(spiders: SpiderFactory) -> None:
    got: list[Any] = []

    class Items(Recorder):
        async def take(self, *args: Any) -> None:
            got.append(args)

    loop = spiders(Items)
    item = Item(url="http://x.test/", nested=Item(depth=2, tags=["a", "b"]), raw=b"\x00\xff", n=None, f=1.5)
    loop.add_task("take", item, [item, {"k": item}], "名字", 2**62, True)
    await loop.serve(idle_exit=0)
    ((first, second, text, big, flag),) = got
    assert type(first) is Item and first == item and type(first.nested) is Item
    assert first.url == "http://x.test/" and first.missing is None
    assert type(second[0]) is Item and type(second[1]["k"]) is Item and type(second[1]) is dict
    assert (text, big, flag) == ("名字", 2**62, True)


async def test_failing_task_retries_then_dead_letters(spiders: SpiderFactory) -> None:
    class Failing(Recorder):
        async def always(self) -> None:
            self.ran.append("always")
            raise ValueError("broken page 42")

        async def twice(self) -> None:
            self.ran.append("twice")
            if self.ran.count("twice") <= 2:
                self.add_task("h", "child-of-failed")  # discarded with the failed attempt
                raise Retry("not yet", delay=0)
            self.add_task("h", "child")
            self.task_done("twice")

    loop = spiders(Failing, max_retries=2, retry_delay=0.01)
    loop.add_task("always", task_name="always")
    loop.add_task("twice", task_name="twice")
    summary = await loop.serve(idle_exit=0)
    assert loop.ran.count("always") == 3, "one try and two retries"
    assert loop.ran.count("twice") == 3
    assert "child" in loop.ran and "child-of-failed" not in loop.ran
    assert summary.buried == 1 and summary.failed == 5
    (letter,) = await _dead_letters(loop)
    assert "ValueError: broken page 42" in letter.error
    assert decode_task(letter.payload).name == "always"
    assert letter.failures == 3
    async with store_of(loop) as store:
        assert await store.done.contains([name_key("twice"), name_key("always")]) == [True, False]


async def test_per_handler_retry_limit(memory_spiders: SpiderFactory) -> None:
    class Limited(Recorder):
        HANDLER_MAX_RETRIES = {"fragile": 0}

        async def fragile(self) -> None:
            self.ran.append("fragile")
            raise RuntimeError("no second chance")

    loop = memory_spiders(Limited, retry_delay=0.01)
    loop.add_task("fragile")
    summary = await loop.serve(idle_exit=0)
    assert loop.ran == ["fragile"] and summary.buried == 1


async def test_task_timeout_fails_the_task(memory_spiders: SpiderFactory) -> None:
    class Hanging(Recorder):
        async def hang(self) -> None:
            self.ran.append("hang")
            await asyncio.Event().wait()

    loop = memory_spiders(Hanging, task_timeout=0.05, max_retries=0)
    loop.add_task("hang")
    summary = await loop.serve(idle_exit=0)
    (letter,) = await _dead_letters(loop)
    assert "task_timeout" in letter.error and summary.buried == 1


async def _dead_letters(loop: AsyncLoop) -> list[Any]:
    async with store_of(loop) as store:
        return await store.queue.dead_letters()


async def _push_raw(loop: AsyncLoop, tasks: list[NewTask]) -> None:
    async with store_of(loop) as store:
        await store.queue.push(tasks)


async def test_poison_entries_are_buried_and_the_loop_goes_on(spiders: SpiderFactory) -> None:
    loop = spiders(Recorder)
    await _push_raw(
        loop,
        [
            NewTask(b"\x01\xc1garbage"),
            NewTask(b"\x09future format"),
            NewTask(encode_task("vanished_handler", "n", [])),
            NewTask(encode_task("stop", None, [])),  # AsyncLoop's own method: never a handler
            NewTask(encode_task("_private", None, [])),
            NewTask(encode_task("h", None, ["fine"])),
        ],
    )
    summary = await loop.serve(idle_exit=0)
    assert loop.ran == ["fine"]
    assert summary.buried == 5
    errors = sorted(d.error for d in await _dead_letters(loop))
    assert sum(e.startswith("undecodable") for e in errors) == 2
    assert sum("unknown task format" in e for e in errors) == 1
    assert sum("unknown handler" in e for e in errors) == 3


async def test_handler_aliases_map_renamed_handlers(memory_spiders: SpiderFactory) -> None:
    class Renamed(Recorder):
        HANDLER_ALIASES = {"old_name": "h"}

    loop = memory_spiders(Renamed)
    await _push_raw(loop, [NewTask(encode_task("old_name", None, ["via alias"]))])
    await loop.serve(idle_exit=0)
    assert loop.ran == ["via alias"]


async def test_add_tasks_in_bulk(spiders: SpiderFactory) -> None:
    class Bulk(Recorder):
        async def run(self) -> None:
            tasks = [Task("h", i, f"n{i}", task_name=f"n{i}", repeat=False) for i in range(2500)]
            await self.add_tasks([*tasks, Task("h", 0, task_name="n0", repeat=False)])  # pending or done: skipped

    loop = spiders(Bulk, concurrency=16)
    await loop.serve(idle_exit=0)
    assert sorted(loop.ran) == list(range(2500))


async def test_run_raising_keeps_its_tasks_and_exits_1(spiders: SpiderFactory) -> None:
    class BadSeed(Recorder):
        async def run(self) -> None:
            self.add_task("h", "seeded")
            raise RuntimeError("seed source down")

    loop = spiders(BadSeed)
    summary = await loop.serve(idle_exit=0)
    assert summary.exit_code == 1
    rest = spiders.subclass(Recorder, loop.name)(config_file=spiders.config)
    await rest.serve(idle_exit=0)
    assert loop.ran + rest.ran == ["seeded"]


def test_add_task_without_event_loop_writes_at_once(spiders: SpiderFactory) -> None:
    """A separate script with a same-NAME class adds tasks; a running loop later does them."""
    spider_cls = spiders.subclass(Recorder)
    adder = spider_cls(config_file=spiders.config)
    adder.add_task("h", "from-script", "s", task_name="s", repeat=False)
    adder.add_task("h", "dup", task_name="s", repeat=False)
    adder.task_done("already")
    adder.close()
    worker = spider_cls(config_file=spiders.config)
    worker.add_task("h", "skipped", task_name="already", repeat=False)
    summary = asyncio.run(worker.serve(idle_exit=0))
    assert worker.ran == ["from-script"] and summary.succeeded == 1
    worker.close()


async def test_progress_line_and_summary(memory_spiders: SpiderFactory, caplog: pytest.LogCaptureFixture) -> None:
    class Slowish(Recorder):
        async def tick(self, i: int) -> None:
            await asyncio.sleep(0.01)
            self.ran.append(i)

        async def wait_for_progress(self) -> None:  # runs until the first progress line is out
            while not any("pages/min" in r.getMessage() for r in caplog.records):
                await asyncio.sleep(0.05)

    caplog.set_level("INFO", logger="achihuo_mini")
    # honoured below the heartbeat interval too (it used to be checked inside the heartbeat loop)
    loop = memory_spiders(Slowish, concurrency=2, heartbeat_interval=5, progress_interval=1)
    for i in range(60):
        loop.add_task("tick", i)
    loop.add_task("wait_for_progress")
    await loop.serve(idle_exit=0)
    progress = [r.getMessage() for r in caplog.records if "pages/min" in r.getMessage()]
    assert progress, "a progress line is logged every progress_interval"
    assert "ready" in progress[-1] and "done names" in progress[-1] and "running" in progress[-1]
    assert "tasks/s" in progress[-1] and "items/min" in progress[-1]
    summary = [r.getMessage() for r in caplog.records if "finished in" in r.getMessage()]
    assert summary and "61 ok" in summary[-1]
    table = [r.getMessage() for r in caplog.records if "stats of this worker" in r.getMessage()]
    assert table and "handler/tick/ok" in table[-1] and "finish_reason" in table[-1]


async def test_adds_from_a_task_the_handler_spawned_are_not_lost(memory_spiders: SpiderFactory) -> None:
    class Spawner(Recorder):
        async def spawn(self) -> None:
            self.later = asyncio.ensure_future(self.add_later())

        async def add_later(self) -> None:
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            self.add_task("h", "added after the handler returned")

    loop = memory_spiders(Spawner)
    loop.add_task("spawn")
    await loop.serve(idle_exit=0.2)
    assert loop.ran == ["added after the handler returned"]


async def test_leases_of_a_lost_reserve_reply_are_given_back(tmp_path: Any) -> None:
    """Fault injection: the backend applies a reserve, then the connection drops before the reply."""
    from achihuo_mini.errors import BackendUnavailable
    from achihuo_mini.plugins import BackendSpec, hookimpl, registry
    from achihuo_mini_backends.memory import MemoryDoneSet, MemoryQueue, drop_namespace

    class LossyQueue(MemoryQueue):
        lost = 0

        async def reserve(self, worker: str, limit: int) -> list[Any]:
            leases = await super().reserve(worker, limit)
            if leases and LossyQueue.lost < 2:
                LossyQueue.lost += 1
                raise BackendUnavailable("connection closed before the reply")
            return leases

    class Plugin:
        @hookimpl
        def achihuo_register_backends(self, register: Any) -> None:
            register(
                BackendSpec("lossy", "process", "test", lambda ns, o: LossyQueue(ns), lambda ns, o: MemoryDoneSet(ns))
            )

    registry.register_plugin(Plugin(), "lossy-plugin")
    try:
        loop = type("Lossy", (Recorder,), {"NAME": "lossy-test"})(cache_backend="lossy")
        for i in range(20):
            loop.add_task("h", i)
        summary = await asyncio.wait_for(loop.serve(idle_exit=0), 30)
        assert sorted(loop.ran) == list(range(20)), "every task ran, none stuck in a lease nobody knows"
        assert LossyQueue.lost == 2 and summary.succeeded == 20
    finally:
        registry.unregister_plugin("lossy-plugin")
        drop_namespace("lossy-test")


async def test_credentials_in_task_names_never_reach_logs_or_dead_letters(
    memory_spiders: SpiderFactory, caplog: pytest.LogCaptureFixture
) -> None:
    class Leaky(Recorder):
        async def fetch(self, url: str) -> None:
            raise RuntimeError(f"could not fetch {url}")

    caplog.set_level("DEBUG", logger="achihuo_mini")
    loop = memory_spiders(Leaky, max_retries=1, retry_delay=0.01)
    url = "http://crawler:hunter2@example.test/page"
    loop.add_task("fetch", url, task_name=url)
    await loop.serve(idle_exit=0)
    (letter,) = await _dead_letters(loop)
    assert "hunter2" not in letter.error and "could not fetch http://crawler:***@example.test/page" in letter.error
    assert "hunter2" not in caplog.text and "crawler:***@" in caplog.text


async def test_rolling_deploy_leaves_new_handlers_to_workers_that_have_them(spiders: SpiderFactory) -> None:
    """An old worker that lacks a handler a live new worker advertises holds the task back instead of burying it."""

    class Old(Recorder):
        pass

    class New(Recorder):
        gate = asyncio.Event()
        entered = asyncio.Event()

        async def block(self) -> None:
            New.entered.set()
            await New.gate.wait()

        async def added_in_v2(self, value: str) -> None:
            self.ran.append(value)

    name = spiders.subclass(Old).NAME
    old = type("Old", (Old,), {"NAME": name})(config_file=spiders.config, heartbeat_interval=0.05)
    new = type("New", (New,), {"NAME": name})(config_file=spiders.config, heartbeat_interval=0.05, concurrency=1)
    new.add_task("block")
    new.add_task("added_in_v2", "v2 task")
    await new.flush()
    new_serving = asyncio.ensure_future(new.serve(slave=True))
    await asyncio.wait_for(New.entered.wait(), 30)  # the new worker is busy: the old one gets the v2 task
    old_serving = asyncio.ensure_future(old.serve(idle_exit=0.3))
    async with store_of(old) as store:
        while (await store.stats()).delayed == 0:  # the old worker releases it with a delay, not to the head
            assert not old_serving.done(), "the old worker ended without holding the task back"
            await asyncio.sleep(0.01)
    New.gate.set()
    old_summary = await asyncio.wait_for(old_serving, 30)
    new.stop()
    await asyncio.wait_for(new_serving, 30)
    assert new.ran == ["v2 task"]
    assert old_summary.buried == 0 and await _dead_letters(old) == []


async def test_tune_gc_raises_the_thresholds_while_serving_and_restores_them(memory_spiders: SpiderFactory) -> None:
    import gc

    from achihuo_mini.async_loop import GC_THRESHOLDS

    seen: list[tuple[int, ...]] = []

    class Looks(Recorder):
        async def look(self) -> None:
            seen.append(gc.get_threshold())

    before = gc.get_threshold()
    tuned = memory_spiders(Looks, tune_gc=True)
    tuned.add_task("look")
    await tuned.serve(idle_exit=0)
    assert seen == [GC_THRESHOLDS] and gc.get_threshold() == before and gc.get_freeze_count() == 0
    plain = memory_spiders(Looks)  # embedding: serve() leaves the collector alone unless asked
    plain.add_task("look")
    await plain.serve(idle_exit=0)
    assert seen[-1] == before


def test_run_until_idle_runs_on_uvloop_when_installed_unless_told_not_to(memory_spiders: SpiderFactory) -> None:
    import importlib.util

    from achihuo_mini import ConfigError

    seen: list[str] = []

    class Where(Recorder):
        async def where(self) -> None:
            seen.append(type(asyncio.get_running_loop()).__module__.partition(".")[0])

    installed = importlib.util.find_spec("uvloop") is not None
    default = memory_spiders(Where)
    default.add_task("where")
    default.run_until_idle()
    plain = memory_spiders(Where, uvloop=False)
    plain.add_task("where")
    plain.run_until_idle()
    assert seen == ["uvloop" if installed else "asyncio", "asyncio"]
    if installed:
        required = memory_spiders(Where, uvloop=True)
        required.add_task("where")
        required.run_until_idle()
        assert seen[-1] == "uvloop"
    else:
        with pytest.raises(ConfigError, match=r'pip install "achihuo_mini\[fast\]"'):
            memory_spiders(Where, uvloop=True).run_until_idle()
