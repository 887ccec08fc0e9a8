"""Per-host politeness held for the whole loop: :class:`LoopHosts`, over the ``HostSlots`` ability.

``per_host_limit`` (requests in flight to one host) and ``per_host_delay`` (seconds between
the starts of two requests to one host, or a larger ``Crawl-delay``) hold across every
worker of a loop whose queue offers :class:`~achihuo_mini.backend.HostSlots`. The slots
and turns live in the backend; this process takes them in batches, so a backend call is
rare compared with requests:

- **slots**: a worker asks for as many slots as it has requests waiting, keeps the slots
  it uses (renewing them every ``min(ttl / 3, 5 s)``; a crashed worker's slots expire
  after ``ttl``, the lease timeout), and gives back slots it has not used for a second.
  When other workers hold or want slots of the same host, a worker gives back, as its
  requests end, what it holds beyond its share (``limit // workers``), so no worker's
  tasks starve. A refused worker asks again after 50 ms, doubling to 1 s.
- **turns**: a worker asks for the host's next starts in a batch (at most a second's
  worth), sized by its waiting requests and grown while whole batches are used; each
  waiting request takes the next turn and sleeps until it. A turn nobody took in time
  is dropped, never used late (the next one may be another worker's).

One background task per serve makes the calls, one call for every host that needs one.
A backend outage makes waiting requests wait (the limits are a promise to the sites);
a fault that repeats fails them (their tasks retry). :func:`loop_hosts` decides at the
start of a serve whether the loop holds the limits for the whole loop, and says so
when it cannot.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from .backend import HostAsk, HostGrant, HostSlots
from .errors import BackendError, BackendUnavailable

if TYPE_CHECKING:
    from ._store import Store

__all__ = ["LoopHosts", "loop_hosts", "politeness_on"]

log = logging.getLogger("achihuo_mini.http")

POLL_MIN = 0.05
"""Seconds before a worker refused a slot asks again; doubles up to :data:`POLL_MAX` while refused."""
POLL_MAX = 1.0
WAIT_MARK = 3 * POLL_MAX
"""Seconds a refused worker counts among a host's workers (it asks again sooner while it waits)."""
RENEW_MAX = 5.0
"""Held slots are renewed every ``min(ttl / 3, RENEW_MAX)`` seconds."""
IDLE_RELEASE = 1.0
"""Seconds a held slot may stay unused before it is given back."""
TURN_WINDOW = 1.0
"""Seconds of a host's starts one call reserves at most."""
FAULT_TRIES = 3
"""Calls that fail with a fault (not an outage) in a row before waiting requests fail."""


def politeness_on(options: Mapping[str, Any]) -> bool:
    """Whether any per-host rule applies (a limit, a delay, or robots.txt's ``Crawl-delay``)."""
    return bool(options.get("per_host_limit") or options.get("per_host_delay") or options.get("obey_robots"))


def loop_hosts(name: str, store: Store, options: Mapping[str, Any], worker: Callable[[], str]) -> LoopHosts | None:
    """The loop-wide gate for one serve, or None (politeness off, ``per_host_scope = "process"``,
    or a queue without the ability: then a warning says the limits hold per process)."""
    if not politeness_on(options) or options.get("per_host_scope") == "process":
        return None
    slots = store.host_slots
    if slots is None:
        log.warning(
            "%s: per_host_limit, per_host_delay and Crawl-delay hold per process: the %r queue cannot hold "
            "them for the whole loop (it does not implement HostSlots), so N workers give a host up to N times "
            "the rate; set per_host_scope = \"process\" to say that is meant",
            name,
            store.settings.queue.backend,
        )
        return None
    return LoopHosts(name, slots, worker, int(options.get("per_host_limit") or 0), float(options["lease_timeout"]))


class _Host:
    """What this process holds and wants of one host."""

    __slots__ = (
        "batch", "delay", "held", "idle_since", "in_use", "last_call", "next_poll", "poll", "release",
        "slot_waiters", "turn_waiters", "turns", "users", "wasted", "workers",
    )  # fmt: skip

    def __init__(self) -> None:
        self.held = 0  # slots held in the backend
        self.in_use = 0  # ... taken by requests of this process
        self.release = 0  # slots to give back at the next call
        self.workers = 1  # workers holding or wanting slots of this host (the last answer)
        self.slot_waiters: deque[asyncio.Future[None]] = deque()
        self.turns: deque[float] = deque()  # granted starts nobody took yet (event-loop time), in order
        self.turn_waiters: deque[asyncio.Future[float]] = deque()
        self.batch = 1  # turns to ask for at least, next time
        self.wasted = False  # turns were dropped unused since the last batch came
        self.delay = 0.0
        self.users = 0
        self.last_call = -math.inf
        self.next_poll = -math.inf
        self.poll = POLL_MIN
        self.idle_since: float | None = None


class LoopHosts:
    """The loop-wide per-host gate of one serve (see the module docstring)."""

    def __init__(self, name: str, slots: HostSlots, worker: Callable[[], str], limit: int, ttl: float) -> None:
        self.name = name
        self.slots = slots
        self.worker = worker
        self.limit = limit
        self.ttl = ttl
        self.renew = min(ttl / 3, RENEW_MAX)
        self.calls = 0  # backend calls made (for tests and benchmarks)
        self._hosts: dict[str, _Host] = {}
        self._wake = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._as: str | None = None  # the incarnation the slots are held for
        self._closed = False
        self._faults = 0

    # -- the gate --------------------------------------------------------------------

    @asynccontextmanager
    async def gate(self, host: str, delay: float) -> AsyncIterator[None]:
        """Hold one of ``host``'s slots (with a limit) and wait for its next turn (with ``delay``)."""
        if len(host) > 255:  # HostAsk.host is at most 255 characters; real host names are shorter
            host = "#" + hashlib.blake2b(host.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
        st = self._hosts.get(host)
        if st is None:
            st = self._hosts[host] = _Host()
        st.users += 1
        slot = False
        try:
            if self.limit > 0:
                await self._take_slot(st)
                slot = True
            if delay > 0:
                st.delay = delay
                await self._take_turn(st)
            yield
        finally:
            st.users -= 1
            if slot:
                self._give_slot(st)

    async def _take_slot(self, st: _Host) -> None:
        if st.in_use < st.held and not st.slot_waiters:
            st.in_use += 1
            st.idle_since = None
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        st.slot_waiters.append(fut)
        st.idle_since = None
        self._kick()
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._give_slot(st)  # granted as it was cancelled: pass it on
            else:
                fut.cancel()
                try:
                    st.slot_waiters.remove(fut)
                except ValueError:
                    pass
            raise

    def _give_slot(self, st: _Host) -> None:
        st.in_use -= 1
        if st.workers > 1 and st.held > max(self._share(st), st.in_use):
            st.held -= 1  # others want this host: what is over our share goes back
            st.release += 1
            self._kick()
        self._hand_off(st)
        if st.in_use < st.held and not st.slot_waiters and st.idle_since is None:
            st.idle_since = asyncio.get_running_loop().time()
            self._kick()

    def _share(self, st: _Host) -> int:
        return self.limit // max(st.workers, 1)

    def _hand_off(self, st: _Host) -> None:
        while st.slot_waiters and st.in_use < st.held:
            fut = st.slot_waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                st.in_use += 1

    async def _take_turn(self, st: _Host) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[float] = loop.create_future()
        st.turn_waiters.append(fut)
        self._assign_turns(st, loop.time())  # first come, first served
        if not fut.done():
            self._kick()
        try:
            start = await fut
        except BaseException:
            fut.cancel()
            try:
                st.turn_waiters.remove(fut)
            except ValueError:
                pass
            raise
        wait = start - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)

    def _drop_past(self, st: _Host, now: float) -> None:
        """Turns whose time passed with nobody to take them are lost (never used late)."""
        dropped = 0
        while st.turns and st.turns[0] < now:
            st.turns.popleft()
            dropped += 1
        if dropped:
            st.wasted = True

    def _assign_turns(self, st: _Host, now: float) -> None:
        self._drop_past(st, now)
        while st.turn_waiters and st.turns:
            fut = st.turn_waiters.popleft()
            if not fut.done():
                fut.set_result(st.turns.popleft())

    def _turn_cap(self, st: _Host) -> int:
        return max(1, int(TURN_WINDOW / st.delay)) if st.delay > 0 else 1

    # -- the calls -------------------------------------------------------------------

    def _kick(self) -> None:
        self._wake.set()
        if (self._runner is None or self._runner.done()) and not self._closed:
            self._runner = asyncio.ensure_future(self._run())
            self._runner.set_name(f"{self.name}-hosts")

    async def _run(self) -> None:
        """Make the calls the hosts need, until closed; never dies of an error (waiters get it)."""
        loop = asyncio.get_running_loop()
        while not self._closed:
            now = loop.time()
            asks: list[tuple[_Host, HostAsk]] = []
            try:
                self._wake.clear()
                asks, due = self._asks(now)
                if not asks:
                    try:
                        async with asyncio.timeout(None if due == math.inf else max(due - now, 0.001)):
                            await self._wake.wait()
                    except TimeoutError:
                        pass
                    continue
                await self._call(asks, now)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a backend error, or a bug of ours: never a silent hang
                await self._failed(asks, exc)

    def _asks(self, now: float) -> tuple[list[tuple[_Host, HostAsk]], float]:
        """The asks due now, and when the next one falls due (event-loop time).

        Slots to give back leave ``held`` for ``release`` when decided; an ask takes them
        out of ``release`` (a failed call puts them back)."""
        asks: list[tuple[_Host, HostAsk]] = []
        due = math.inf
        for host, st in list(self._hosts.items()):
            want = 0
            if st.slot_waiters and st.in_use >= st.held:
                if now >= st.next_poll:
                    want = len(st.slot_waiters)
                else:
                    due = min(due, st.next_poll)
            if st.idle_since is not None:
                if st.held <= st.in_use or st.slot_waiters:
                    st.idle_since = None
                elif now - st.idle_since >= IDLE_RELEASE:
                    st.release += st.held - st.in_use
                    st.held = st.in_use
                    st.idle_since = None
                else:
                    due = min(due, st.idle_since + IDLE_RELEASE)
            turns = 0
            if st.turn_waiters:
                self._assign_turns(st, now)
                if st.turn_waiters:  # out of turns: twice as many as last time if all were used, half if not
                    st.batch = max(1, st.batch // 2) if st.wasted else min(self._turn_cap(st), 2 * st.batch)
                    turns = min(self._turn_cap(st), max(len(st.turn_waiters), st.batch))
            renew = st.held > 0 and now - st.last_call >= self.renew
            if want or st.release or turns or renew:
                asks.append((st, HostAsk(host, want, self.limit, st.release, turns, st.delay)))
                st.release = 0
            else:
                if st.held > 0:
                    due = min(due, st.last_call + self.renew)
                if not (st.users or st.held or st.turns or st.slot_waiters or st.turn_waiters):
                    del self._hosts[host]
        return asks, due

    async def _call(self, asks: list[tuple[_Host, HostAsk]], now: float) -> None:
        worker = self.worker()
        if worker != self._as:
            if self._as is not None:  # a new incarnation: what the old one held expires with it
                for st in self._hosts.values():
                    st.held = st.release = 0
                asks = [(st, HostAsk(a.host, a.slots, a.limit, 0, a.turns, a.delay)) for st, a in asks]
            self._as = worker
        self.calls += 1
        try:
            grants = await self.slots.claim_hosts(worker, [a for _, a in asks], self.ttl, WAIT_MARK)
            if not isinstance(grants, list) or len(grants) != len(asks) or not all(map(_valid, grants)):
                raise BackendError(f"claim_hosts() answered {repr(grants)[:100]} for {len(asks)} asks")
        except BaseException:
            for st, ask in asks:
                st.release += ask.release  # not given back after all: the next call tries again
            raise
        self._faults = 0
        after = asyncio.get_running_loop().time()
        for (st, ask), grant in zip(asks, grants, strict=True):
            st.last_call = now
            st.workers = max(grant.workers, 1)
            # the backend's count, less what was given back while the call was under way
            st.held = max(grant.held - st.release, 0)
            if ask.slots:
                if grant.slots < ask.slots:
                    st.next_poll = after + st.poll * random.uniform(0.5, 1.5)
                    at_share = st.workers > 1 and st.held >= self._share(st)
                    st.poll = POLL_MAX if at_share else min(POLL_MAX, 2 * st.poll)
                else:
                    st.poll = POLL_MIN
            self._hand_off(st)
            if st.in_use < st.held and not st.slot_waiters and st.idle_since is None:
                st.idle_since = after
            if grant.turns:
                first = after + grant.start
                st.turns.extend(first + i * ask.delay for i in range(grant.turns))
                st.wasted = False
            self._assign_turns(st, after)

    async def _failed(self, asks: list[tuple[_Host, HostAsk]], exc: Exception) -> None:
        if isinstance(exc, BackendUnavailable):
            log.warning("%s: per-host slots: %s; requests to those hosts wait", self.name, exc)
            await asyncio.sleep(1.0)
            return
        self._faults += 1
        if not isinstance(exc, BackendError):
            log.error("%s: per-host slots failed unexpectedly", self.name, exc_info=exc)
            exc = BackendError(f"per-host slots: {type(exc).__name__}: {exc}")
        else:
            log.error("%s: per-host slots: %s", self.name, exc)
        if self._faults >= FAULT_TRIES:
            self._faults = 0
            for st, _ in asks:  # their tasks fail (and retry) rather than wait for ever
                waiters: list[asyncio.Future[Any]] = [*st.slot_waiters, *st.turn_waiters]
                for fut in waiters:
                    if not fut.done():
                        fut.set_exception(exc)
                st.slot_waiters.clear()
                st.turn_waiters.clear()
        await asyncio.sleep(0.2 * 2**self._faults)

    async def close(self) -> None:
        """Stop the calls and give back every slot this worker holds (they would expire anyway)."""
        self._closed = True
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
            await asyncio.wait([runner])
        asks = [HostAsk(h, release=st.held + st.release) for h, st in self._hosts.items() if st.held or st.release]
        self._hosts.clear()
        if asks and self._as == self.worker():
            try:
                await self.slots.claim_hosts(self._as, asks, self.ttl, WAIT_MARK)
            except BackendError as exc:
                log.warning("%s: could not give back per-host slots (they expire by themselves): %s", self.name, exc)


def _valid(grant: Any) -> bool:
    return (
        isinstance(grant, HostGrant)
        and all(type(v) is int and v >= 0 for v in (grant.slots, grant.held, grant.workers, grant.turns))
        and type(grant.start) in (int, float)
        and math.isfinite(grant.start)
        and grant.start >= 0
    )
