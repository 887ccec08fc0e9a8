"""The contract of the optional :class:`~achihuo_mini.backend.CounterStore` ability (the loop's statistics).

Mixed into :class:`~achihuo_mini.testing.BackendContract`; its tests run only for a queue
that declares the ability. They use the ``queue`` and ``backends`` fixtures of that class.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ..backend import CounterStore, QueueBackend

__all__ = ["CounterContract"]


class CounterContract:
    @pytest.fixture
    def counters(self, queue: QueueBackend) -> CounterStore:
        if not isinstance(queue, CounterStore):
            pytest.skip("backend does not declare the CounterStore ability")  # declared ability, not a missing dep
        return queue

    async def test_counts_add_up_across_calls_and_objects(self, counters: CounterStore, backends: Any) -> None:
        assert await counters.counts() == {}
        await counters.add_counts({"tasks/ok": 3, "http/status/200": 2})
        other = await backends.queue(backends.namespace())  # a second worker of the same loop
        await other.add_counts({"tasks/ok": 4, "custom/items": 1})
        assert await counters.counts() == {"tasks/ok": 7, "http/status/200": 2, "custom/items": 1}
        await counters.add_counts({})
        assert (await other.counts())["tasks/ok"] == 7

    async def test_max_and_min_names_keep_the_extreme(self, counters: CounterStore) -> None:
        await counters.add_counts({"max/last_seen": 50, "min/first_start": 50})
        await counters.add_counts({"max/last_seen": 40, "min/first_start": 40})
        await counters.add_counts({"max/last_seen": 60, "min/first_start": 60})
        assert await counters.counts() == {"max/last_seen": 60, "min/first_start": 40}

    async def test_counters_of_two_loops_stay_apart_and_clear_alone(
        self, counters: CounterStore, backends: Any
    ) -> None:
        other = await backends.queue(backends.namespace("other"))
        await counters.add_counts({"tasks/ok": 1})
        await other.add_counts({"tasks/ok": 10})
        await counters.clear_counts()
        assert await counters.counts() == {}
        assert await other.counts() == {"tasks/ok": 10}

    async def test_concurrent_adds_lose_nothing(self, counters: CounterStore, backends: Any) -> None:
        queues = [counters, *[await backends.queue(backends.namespace()) for _ in range(3)]]
        await asyncio.gather(*(q.add_counts({"n": 1, "m": 2}) for q in queues for _ in range(25)))
        assert await counters.counts() == {"n": 100, "m": 200}

    @pytest.mark.parametrize(
        "bad",
        [{"x": 1.5}, {"x": True}, {"x": "3"}, {"": 1}, {"x" * 201: 1}, {1: 1}, {"x": 2**63}],
        ids=["float", "bool", "str", "empty name", "long name", "int name", "too big"],
    )
    async def test_bad_counters_are_refused_and_nothing_is_written(self, counters: CounterStore, bad: Any) -> None:
        with pytest.raises(Exception):  # noqa: B017 -- any error: the loop turns it into a BackendError
            await counters.add_counts({"good": 1, **bad})
        assert await counters.counts() == {}

    async def test_many_counters_and_big_values(self, counters: CounterStore) -> None:
        many = {f"http/host/h{i}.example": i for i in range(1, 1500)}
        await counters.add_counts(many)
        await counters.add_counts({"big": 2**62, "neg": -5})
        found = await counters.counts()
        assert {k: found[k] for k in many} == many
        assert found["big"] == 2**62 and found["neg"] == -5
