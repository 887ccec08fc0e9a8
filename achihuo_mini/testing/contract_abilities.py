"""Contract tests of the optional abilities ``ExpiringDoneSet`` and ``HostSlots``.

Part of :class:`~achihuo_mini.testing.BackendContract` (its base classes); each test runs
only when the backend declares the ability, and is skipped otherwise (a declared ability,
not a missing dependency). Times are generous: these tests check what is promised (never
before the ttl; within about a second after it), not how fast.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from ..backend import Commit, DoneSetBackend, ExpiringDoneSet, HostAsk, HostGrant, HostSlots, NewTask, QueueBackend
from ..backend import name_key as K
from .helpers import wait_until

__all__ = ["ExpiringDoneSetContract", "HostSlotsContract"]

SLACK = 1.5
"""Seconds past a ttl by which a backend must have let a name go (it may round up by one)."""


class ExpiringDoneSetContract:
    """``ExpiringDoneSet``: names that stop counting as done once their ttl has passed."""

    @pytest.fixture
    def expiring(self, done: DoneSetBackend) -> ExpiringDoneSet:
        if not isinstance(done, ExpiringDoneSet):
            pytest.skip("backend does not declare the ExpiringDoneSet ability")  # declared ability, not a missing dep
        return done

    async def test_expiring_names_age_out(self, expiring: ExpiringDoneSet, done: DoneSetBackend) -> None:
        ttl = 1.0
        assert await expiring.add_expiring([]) == 0
        started = time.monotonic()
        assert await expiring.add_expiring([(K("ages"), ttl), (K("kept"), ttl), (K("gone"), ttl)]) == 3
        assert await expiring.add_expiring([(K("ages"), ttl), (K("new"), 60.0)]) == 1, "one was done already"
        assert await done.add([K("kept")]) == 0, "a done name is not new, with a ttl or without"
        assert await done.remove([K("gone")]) == 1
        assert await done.add([K("forever")]) == 1
        assert await done.contains([K("ages"), K("kept"), K("gone"), K("new"), K("forever")]) == [
            True, True, False, True, True,
        ]  # fmt: skip

        async def aged() -> bool:
            return (await done.contains([K("ages")])) == [False]

        await wait_until(aged, timeout=ttl + SLACK + 5)
        waited = time.monotonic() - started
        assert waited >= ttl - 0.05, f"a name stopped counting as done after {waited:.2f} s, before its ttl of {ttl} s"
        assert await done.contains([K("ages"), K("kept"), K("new"), K("forever")]) == [False, True, True, True], (
            "add() makes an expiring name permanent; others keep their own ttl"
        )
        assert await expiring.add_expiring([(K("ages"), 60.0)]) == 1, "a name whose ttl passed is new again"
        assert await done.add([K("new")]) == 0
        assert await done.remove([K("ages"), K("new")]) == 2
        assert await done.contains([K("ages"), K("new")]) == [False, False]
        assert await done.count() >= 2  # kept, forever (names whose ttl passed may still be counted)
        await done.clear()
        assert await done.count() == 0

    async def test_recrawl_after_ttl(self, expiring: ExpiringDoneSet, queue: QueueBackend) -> None:
        """A name a commit marked done for 2 s blocks unique pushes for 2 s, then lets one through."""
        ttl = 2.0
        key = K("https://example.com/weekly")
        assert await queue.push([NewTask(b"p", key=key, unique=True)]) == 1
        (lease,) = await queue.reserve("w1", 1)
        started = time.monotonic()
        assert await queue.commit([Commit(lease, expiring=[(key, ttl)])]) == 1
        assert await queue.push([NewTask(b"again", key=key, unique=True)]) == 0, "done: the re-add is skipped"

        async def addable() -> bool:
            return await queue.push([NewTask(b"again", key=key, unique=True)]) == 1

        await wait_until(addable, timeout=ttl + SLACK + 5, interval=0.05)
        waited = time.monotonic() - started
        assert waited >= ttl - 0.05, f"the name was addable after {waited:.2f} s, before its ttl of {ttl} s"
        (again,) = await queue.reserve("w1", 1)
        assert again.payload == b"again"
        assert await queue.commit([Commit(again, done=[key])]) == 1
        assert await queue.push([NewTask(b"third", key=key, unique=True)]) == 0, "done for ever now"

    async def test_last_done_change_of_a_commit_batch_wins(
        self, expiring: ExpiringDoneSet, queue: QueueBackend, done: DoneSetBackend
    ) -> None:
        await queue.push([NewTask(f"p{i}".encode()) for i in range(3)])
        a, b, c = await queue.reserve("w1", 3)
        commits = [
            Commit(a, done=[K("x")], expiring=[(K("y"), 60.0)]),
            Commit(b, expiring=[(K("x"), 60.0), (K("z"), 60.0)]),
            Commit(c, undone=[K("z")]),
        ]
        assert await queue.commit(commits) == 3
        assert await done.contains([K("x"), K("y"), K("z")]) == [True, True, False]


class HostSlotsContract:
    """``HostSlots``: per-host slots and turns shared by every instance on one namespace."""

    @pytest.fixture
    def slots(self, queue: QueueBackend) -> HostSlots:
        if not isinstance(queue, HostSlots):
            pytest.skip("backend does not declare the HostSlots ability")  # declared ability, not a missing dep
        return queue

    async def _other(self, backends: Any) -> HostSlots:
        other = await backends.queue()  # the same namespace, another instance (another worker's)
        assert isinstance(other, HostSlots)
        return other

    async def test_slots_hold_the_limit_across_workers(self, slots: HostSlots, backends: Any) -> None:
        other = await self._other(backends)
        (g,) = await slots.claim_hosts("w-a", [HostAsk("example.com", slots=3, limit=4)], 5, 5)
        assert (g.slots, g.held, g.workers) == (3, 3, 1)
        (g,) = await other.claim_hosts("w-b", [HostAsk("example.com", slots=3, limit=4)], 5, 5)
        assert (g.slots, g.held, g.workers) == (1, 1, 2), "only what is left of the limit"
        (g,) = await slots.claim_hosts("w-a", [HostAsk("example.com")], 5, 5)
        assert (g.slots, g.held, g.workers) == (0, 3, 2), "a call renews; the waiting worker counts"
        g, h = await slots.claim_hosts(
            "w-a", [HostAsk("example.com", release=2), HostAsk("other.org", slots=9, limit=4)], 30, 5
        )
        assert (g.held, h.slots, h.held, h.workers) == (1, 4, 4, 1), "hosts are apart"
        (g,) = await other.claim_hosts("w-b", [HostAsk("example.com", slots=5, limit=4)], 5, 5)
        assert (g.slots, g.held) == (2, 3)
        (g,) = await slots.claim_hosts("w-a", [HostAsk("example.com", release=99)], 5, 5)
        assert g.held == 0, "a release beyond what is held gives back all"
        (g,) = await other.claim_hosts("w-b", [HostAsk("example.com", slots=1, limit=4)], 5, 5)
        assert (g.slots, g.held) == (1, 4)

    async def test_slots_without_a_limit_and_grant_shape(self, slots: HostSlots) -> None:
        (g,) = await slots.claim_hosts("w-a", [HostAsk("free.example", turns=0)], 5, 5)
        assert isinstance(g, HostGrant) and (g.slots, g.held, g.turns, g.start) == (0, 0, 0, 0)
        assert await slots.claim_hosts("w-a", [], 5, 5) == []

    async def test_a_dead_workers_slots_expire(self, slots: HostSlots, backends: Any) -> None:
        other = await self._other(backends)
        ttl = 0.5
        (g,) = await slots.claim_hosts("dying", [HostAsk("h.example", slots=2, limit=2)], ttl, 0.1)
        assert g.slots == 2
        (g,) = await other.claim_hosts("alive", [HostAsk("h.example", slots=2, limit=2)], 5, 0.1)
        assert g.slots == 0 and g.workers == 2
        started = time.monotonic()
        got = 0

        async def freed() -> bool:
            nonlocal got
            (g,) = await other.claim_hosts("alive", [HostAsk("h.example", slots=2 - got, limit=2)], 5, 0.1)
            got = g.held
            return got == 2

        await wait_until(freed, timeout=10, interval=0.05)
        assert time.monotonic() - started < ttl + SLACK + 5
        await asyncio.sleep(0.2)  # past the wait mark of 0.1 s
        (g,) = await other.claim_hosts("alive", [HostAsk("h.example")], 5, 0.1)
        assert g.workers == 1, "a dead worker's holding and a passed wait mark count for nothing"

    async def test_turns_are_spaced_across_workers(self, slots: HostSlots, backends: Any) -> None:
        other = await self._other(backends)
        delay = 0.2
        started = time.monotonic()
        (a,) = await slots.claim_hosts("w-a", [HostAsk("t.example", turns=3, delay=delay)], 5, 5)
        (b,) = await other.claim_hosts("w-b", [HostAsk("t.example", turns=2, delay=delay)], 5, 5)
        (c,) = await slots.claim_hosts("w-a", [HostAsk("t.example", turns=1, delay=delay)], 5, 5)
        took = time.monotonic() - started
        assert (a.turns, b.turns, c.turns) == (3, 2, 1)
        assert a.start <= took + 0.05, "the first start of a fresh host is now"
        # in one clock: b's first start comes 3 delays after a's, c's 2 after b's (to 10 ms, minus the time passed)
        assert 3 * delay - took - 0.01 <= b.start <= 3 * delay + 0.02
        assert 5 * delay - took - 0.01 <= c.start <= 5 * delay + 0.02
        (d,) = await other.claim_hosts("w-b", [HostAsk("u.example", turns=4, delay=delay)], 5, 5)
        assert d.start <= took + 0.05, "hosts are apart"

    async def test_host_slots_of_two_loops_are_apart(self, slots: HostSlots, backends: Any) -> None:
        elsewhere = await backends.queue(backends.namespace("other-loop"))
        assert isinstance(elsewhere, HostSlots)
        (g,) = await slots.claim_hosts("w-a", [HostAsk("same.example", slots=1, limit=1, turns=1, delay=30)], 5, 5)
        assert g.slots == 1
        (g,) = await elsewhere.claim_hosts("w-b", [HostAsk("same.example", slots=1, limit=1, turns=1, delay=30)], 5, 5)
        assert (g.slots, g.workers) == (1, 1) and g.start < 1, "another loop's slots and turns are its own"
