"""The local dedup cache may drop a repeat=False add only where the backend would certainly drop it too.

It holds names this process itself wrote to the done set (task_done), each until
dedup_cache_ttl has passed, checked at lookup. Pending is never cached: whether a name is
pending changes with every ack anywhere. The holes these tests pin down (each dropped work
that the backend would have accepted) were found by using the loop as a crawler author would.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from achihuo_mini import AsyncLoop, ConfigError, Item

from .conftest import SpiderFactory, store_of


class Crawler(AsyncLoop):
    """Each page links to every page: almost every add is a repeat."""

    PAGES = 30

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("concurrency", 4)
        super().__init__(**kwargs)
        self.fetched: list[str] = []

    async def run(self) -> None:
        self.add_task("page", Item(url="p0"), task_name="p0", repeat=False)

    async def page(self, item: Item) -> None:
        self.fetched.append(item.url)
        for i in range(self.PAGES):
            url = f"p{i}"
            self.add_task("page", Item(url=url), task_name=url, repeat=False)
        self.task_done(item.url)


async def test_every_page_runs_once(spiders: SpiderFactory) -> None:
    loop = spiders(Crawler)
    summary = await loop.serve(idle_exit=0)
    assert sorted(loop.fetched) == sorted(f"p{i}" for i in range(30)), "each page exactly once"
    assert summary.succeeded == 30 and summary.exit_code == 0
    # 30 pages x 30 links: links to pages this process already marked done never leave it
    assert summary.deduplicated > 0, summary
    assert summary.offered == 1 + 900, "every add is written, skipped by the backend or dropped here"
    assert summary.added == 30, "only the first add of each page was written"
    async with store_of(loop) as store:
        assert await store.done_count() == 30


class Monitor(AsyncLoop):
    """A re-crawl chain: a handler that schedules its own name again, later."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("concurrency", 2)
        super().__init__(**kwargs)
        self.checks: list[int] = []

    async def check(self, url: str, n: int) -> None:
        self.checks.append(n)
        if n < 3:
            self.add_task("check", url, n + 1, task_name=url, repeat=False, delay=0.05)


async def test_a_handler_can_reschedule_its_own_name(spiders: SpiderFactory) -> None:
    """Its own pending count drops with its ack, so the backend accepts the add: so must the cache."""
    loop = spiders(Monitor)
    loop.add_task("check", "http://example.test/", 1, task_name="http://example.test/", repeat=False)
    summary = await loop.serve(idle_exit=0.3)
    assert loop.checks == [1, 2, 3], "each scheduled check ran"
    assert summary.deduplicated == 0


class Steps(AsyncLoop):
    """Handlers that leave a name done, not done, or buried."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("concurrency", 1)
        kwargs.setdefault("max_retries", 0)
        super().__init__(**kwargs)
        self.ran: list[str] = []

    async def done(self, label: str) -> None:
        self.ran.append(label)
        self.task_done("x")

    async def not_done(self, label: str) -> None:
        self.ran.append(label)  # acked without task_done: "x" is then neither done nor pending

    async def broken(self, label: str) -> None:
        self.ran.append(label)
        raise RuntimeError("buried at once (max_retries=0)")

    async def uncache_then_add(self, label: str) -> None:
        self.ran.append(label)
        self.uncache_task("x")
        self.add_task("done", "re-added", task_name="x", repeat=False)

    async def add_x(self, label: str) -> None:
        self.ran.append(label)
        self.add_task("done", f"from {label}", task_name="x", repeat=False)


@pytest.mark.parametrize("handler", ["not_done", "broken"])
async def test_a_feeder_can_re_add_a_name_another_worker_acked_or_buried(spiders: SpiderFactory, handler: str) -> None:
    """A feeder (another instance: another process's cache) adds x; a worker acks it without
    task_done, or buries it; x is neither done nor pending, so the feeder's next add must run."""
    worker = spiders(Steps)
    feeder = type(worker)(config_file=spiders.config)  # same NAME, same data, its own cache
    feeder.add_task(handler, "first", task_name="x", repeat=False)
    await feeder.flush()
    await worker.serve(idle_exit=0)
    assert worker.ran == ["first"]
    feeder.add_task(handler, "second", task_name="x", repeat=False)
    await feeder.flush()
    await worker.serve(idle_exit=0)
    assert worker.ran == ["first", "second"], "the second add was dropped although x was neither done nor pending"


async def test_a_name_forgotten_on_failure_is_not_relearned_from_a_sibling(memory_spiders: SpiderFactory) -> None:
    """Two handlers finish in one committer round: one buries x, the other added x while it
    was pending (the backend skipped that add). A later add of x must reach the backend."""
    loop = memory_spiders(Steps, concurrency=2)
    loop.add_task("broken", "x fails", task_name="x")
    loop.add_task("add_x", "sibling")
    await loop.serve(idle_exit=0)
    assert sorted(loop.ran) == ["sibling", "x fails"]
    loop.ran.clear()
    loop.add_task("done", "later", task_name="x", repeat=False)
    await loop.serve(idle_exit=0)
    assert loop.ran == ["later"]


async def test_a_name_this_process_marked_done_is_dropped_until_it_uncaches_it(spiders: SpiderFactory) -> None:
    loop = spiders(Steps)
    loop.task_done("x")
    await loop.flush()  # written: now the cache knows x is done
    loop.add_task("done", "dup", task_name="x", repeat=False)
    async with store_of(loop) as store:
        await loop.flush()
        assert (await store.stats()).ready == 0, "dropped: x is done"
        loop.uncache_task("x")  # this process's own uncache is honoured at once, even unwritten
        loop.add_task("done", "re-added", task_name="x", repeat=False)
        await loop.flush()
        assert (await store.stats()).ready == 1
    await loop.serve(idle_exit=0)
    assert loop.ran == ["re-added"]


async def test_an_uncache_elsewhere_is_seen_once_the_entry_expires(memory_spiders: SpiderFactory) -> None:
    """Another process's uncache is invisible to this cache; dedup_cache_ttl bounds how long --
    and it is checked at every lookup, also in a feeder whose adds all hit the cache."""
    loop = memory_spiders(Steps, dedup_cache_ttl=0.2)
    loop.task_done("x")
    await loop.flush()  # written, and learnt
    other = type(loop)(config_file=memory_spiders.config)
    other.uncache_task("x")
    await other.flush()
    async with store_of(loop) as store:
        loop.add_task("done", "within the ttl", task_name="x", repeat=False)
        await loop.flush()
        assert (await store.stats()).ready == 0, "within the TTL the stale entry drops it (the documented window)"
        await asyncio.sleep(0.25)  # the property under test is time itself: let the TTL pass
        loop.add_task("done", "after the ttl", task_name="x", repeat=False)
        await loop.flush()
        assert (await store.stats()).ready == 1


async def test_the_cache_keeps_at_most_dedup_cache_names(memory_spiders: SpiderFactory) -> None:
    class Many(Crawler):
        PAGES = 50

    loop = memory_spiders(Many, dedup_cache=20)
    summary = await loop.serve(idle_exit=0)
    assert sorted(loop.fetched) == sorted(f"p{i}" for i in range(50))
    assert summary.deduplicated > 0


async def test_turned_off_every_add_reaches_the_backend(memory_spiders: SpiderFactory) -> None:
    loop = memory_spiders(Crawler, dedup_cache=0)
    summary = await loop.serve(idle_exit=0)
    assert sorted(loop.fetched) == sorted(f"p{i}" for i in range(30))
    assert summary.deduplicated == 0


def test_a_cached_duplicate_is_dropped_unchecked_a_new_name_is_checked(memory_spiders: SpiderFactory) -> None:
    """A local drop stores nothing, so its arguments are not even looked at (that is most of
    its cost); the first add of every name is never a cache hit, so a bad argument still
    raises there, and an unknown handler always raises."""
    loop = memory_spiders(Steps)
    loop.task_done("x")  # no event loop: written at once, and learnt
    loop.add_task("done", {"bad": (1, 2)}, task_name="x", repeat=False)  # dropped: x is done
    with pytest.raises(TypeError, match=r"args\[0\]\['bad'\]: tuple"):
        loop.add_task("done", {"bad": (1, 2)}, task_name="y", repeat=False)
    with pytest.raises(TypeError, match=r"args\[0\]\['bad'\]: tuple"):
        loop.add_task("done", {"bad": (1, 2)}, task_name="x")  # repeat=True: never dropped
    with pytest.raises(Exception, match="not a handler"):
        loop.add_task("nope", "a", task_name="x", repeat=False)
    loop.close()


@pytest.mark.parametrize(("option", "value"), [("dedup_cache", -1), ("dedup_cache_ttl", 0)])
def test_bad_options_are_config_errors(option: str, value: float) -> None:
    cls = type("Bad", (Steps,), {"NAME": "dedup-bad-options"})
    with pytest.raises(ConfigError, match=option):
        cls(cache_backend="memory", **{option: value})
