"""The local dedup cache: repeat=False names this process knows are done or pending are skipped
without encoding or a round trip -- and forgotten whenever they may no longer be either."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from achihuo_mini import AsyncLoop, ConfigError, Item

from .conftest import SpiderFactory


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


async def test_every_page_runs_once_and_repeats_are_skipped_locally(spiders: SpiderFactory) -> None:
    loop = spiders(Crawler)
    summary = await loop.serve(idle_exit=0)
    assert sorted(loop.fetched) == sorted(f"p{i}" for i in range(30)), "each page exactly once"
    assert summary.succeeded == 30 and summary.exit_code == 0
    # 30 pages x 30 links = 900 adds of 30 names; the backend decided at least the first of
    # each; most of the rest never left the process
    assert summary.deduplicated > 900 // 2, summary
    assert summary.added + summary.deduplicated == 1 + 900, "every add is either handed on or dropped here"
    assert await _done_count(loop) == 30


async def test_a_separate_done_set_feeds_the_cache_too(tmp_path: Path) -> None:
    """Queue in memory, done set in SQLite: the loop filters unique pushes itself."""
    config = tmp_path / "mixed.toml"
    config.write_text(f'[queue]\nbackend = "memory"\n[done]\nbackend = "sqlite"\npath = "{tmp_path / "d.sqlite3"}"\n')
    cls = type("Mixed", (Crawler,), {"NAME": f"dedup-mixed-{uuid.uuid4().hex[:8]}"})
    loop = cls(config_file=config)
    assert not loop._shared
    summary = await loop.serve(idle_exit=0)
    assert sorted(loop.fetched) == sorted(f"p{i}" for i in range(30))
    assert summary.deduplicated > 900 // 2
    assert await _done_count(loop) == 30


async def test_turned_off_every_add_reaches_the_backend(memory_spiders: SpiderFactory) -> None:
    loop = memory_spiders(Crawler, dedup_cache=0)
    summary = await loop.serve(idle_exit=0)
    assert sorted(loop.fetched) == sorted(f"p{i}" for i in range(30))
    assert summary.deduplicated == 0 and not loop._dedup


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
        self.add_task("done", label, task_name="x", repeat=False)


async def test_a_done_name_is_skipped_until_this_process_uncaches_it(memory_spiders: SpiderFactory) -> None:
    loop = memory_spiders(Steps)
    loop.add_task("done", "first", task_name="x", repeat=False)
    loop.add_task("add_x", "dup")  # runs after "first" committed: skipped by the cache
    summary = await loop.serve(idle_exit=0)
    assert loop.ran == ["first"]
    assert "x" in loop._dedup and summary.deduplicated == 1
    # same process, same serve: uncache, then add again -> not skipped
    loop.ran.clear()
    loop.add_task("uncache_then_add", "u")
    loop.add_task("add_x", "after")  # "x" is pending or done again by then
    summary = await loop.serve(idle_exit=0)
    assert loop.ran == ["u", "re-added"]


@pytest.mark.parametrize("handler", ["not_done", "broken"])
async def test_a_name_acked_without_task_done_or_buried_is_forgotten(
    memory_spiders: SpiderFactory, handler: str
) -> None:
    loop = memory_spiders(Steps)
    loop.add_task("add_x", "seed")
    loop.add_task(handler, "ends-x", task_name="x")
    loop.add_task("add_x", "again")
    summary = await loop.serve(idle_exit=0)
    # add_x(seed) pushes done(x) with repeat=False while the task named x is queued: the
    # backend skips it (pending), and the cache learns "x is pending". That task then ends
    # without task_done (acked, or buried): x is neither done nor pending, so the cache must
    # forget it -- add_x(again) reaches the backend and runs. Remembered, it would be lost.
    assert loop.ran == ["ends-x", "again"], loop.ran
    assert summary.deduplicated == 0


async def test_a_name_uncached_elsewhere_is_seen_once_the_cache_expires(memory_spiders: SpiderFactory) -> None:
    """Another process's uncache is invisible to this cache; dedup_cache_ttl bounds how long."""
    loop = memory_spiders(Steps)
    loop.add_task("done", "first", task_name="x", repeat=False)
    await loop.serve(idle_exit=0)
    loop._dedup["x"] = None  # what this process learnt (serve() starts empty; this is the state mid-run)
    other = type(loop)()  # a second instance: same NAME, so the same data
    other.uncache_task("x")
    await other.flush()
    loop.add_task("done", "stale-skip", task_name="x", repeat=False)
    assert loop._outbox.tasks == [], "within the TTL the stale cache skips it"
    loop._dedup_since = time.monotonic() - loop._dedup_ttl - 1  # the TTL has passed
    loop._learn(loop._outbox)  # any write empties an expired cache
    loop.add_task("done", "seen", task_name="x", repeat=False)
    assert len(loop._outbox.tasks) == 1


async def test_the_cache_keeps_at_most_dedup_cache_names(memory_spiders: SpiderFactory) -> None:
    class Many(Crawler):
        PAGES = 50

    loop = memory_spiders(Many, dedup_cache=20)
    summary = await loop.serve(idle_exit=0)
    assert sorted(loop.fetched) == sorted(f"p{i}" for i in range(50))
    assert len(loop._dedup) <= 20
    assert summary.deduplicated > 0


async def test_a_cached_duplicate_is_dropped_unchecked_a_new_name_is_checked(memory_spiders: SpiderFactory) -> None:
    """A local skip stores nothing, so its arguments are not even looked at (that is most of
    its cost); the first add of every name is never a cache hit, so a bad argument still
    raises there, and an unknown handler always raises."""
    loop = memory_spiders(Steps)
    loop._dedup["x"] = None
    loop.add_task("done", {"bad": (1, 2)}, task_name="x", repeat=False)
    assert loop._outbox.tasks == [] and loop._summary.deduplicated == 1
    with pytest.raises(TypeError, match=r"args\[0\]\['bad'\]: tuple"):
        loop.add_task("done", {"bad": (1, 2)}, task_name="y", repeat=False)
    with pytest.raises(TypeError, match=r"args\[0\]\['bad'\]: tuple"):
        loop.add_task("done", {"bad": (1, 2)}, task_name="x")  # repeat=True: never skipped
    with pytest.raises(Exception, match="not a handler"):
        loop.add_task("nope", "a", task_name="x", repeat=False)


@pytest.mark.parametrize(("option", "value"), [("dedup_cache", -1), ("dedup_cache_ttl", 0)])
def test_bad_options_are_config_errors(option: str, value: float) -> None:
    cls = type("Bad", (Steps,), {"NAME": "dedup-bad-options"})
    with pytest.raises(ConfigError, match=option):
        cls(cache_backend="memory", **{option: value})


async def _done_count(loop: AsyncLoop) -> int:
    await loop._open()
    try:
        return await loop._done.count()
    finally:
        await loop._close_backends()
