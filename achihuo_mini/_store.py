"""The queue and the done set as one store: the only place the core calls a backend.

- :class:`Store` opens and closes the pair, writes an outbox (done-set changes first,
  then the pushes), commits finished attempts, and decides once whether the queue
  shares the done set (one atomic commit) or not (done names first: a duplicate at
  worst, never a loss).
- Every backend object is wrapped by :func:`guard`: whatever a plugin raises becomes a
  :class:`~achihuo_mini.errors.BackendError` naming the plugin and the method
  (``ConnectionError``/``TimeoutError``: ``BackendUnavailable``), so the rest of the core
  handles two kinds of failure, not every driver's.
- :class:`Backoff` makes every "the backend failed, wait and try again" decision.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

from ._outbox import Attempt, Outbox
from .backend import (
    SCOPE_ORDER,
    Commit,
    CounterStore,
    DeadLetter,
    DoneSetBackend,
    ExpiringDoneSet,
    HostSlots,
    Lease,
    NewTask,
    Notifier,
    QueueBackend,
    QueueStats,
    WorkerRegistry,
)
from .backend_kit import counter_ok
from .config import Settings
from .errors import BackendError, BackendUnavailable, ConfigError, PluginError
from .masking import mask_secrets

__all__ = ["Backoff", "Store", "guard", "wait_event"]

log = logging.getLogger("achihuo_mini")

_T = TypeVar("_T")
_SYNC_METHODS = frozenset({"shares_done_set"})
_PASS_THROUGH = (BackendError, ConfigError, PluginError)
NOTIFY_WAIT = 5.0  # seconds one backend wait for new tasks may block (local events wake us sooner)


def _fault(label: str, method: str, exc: BaseException) -> BackendError:
    text = mask_secrets(str(exc))[:500]
    message = f"{label}.{method}() raised {type(exc).__name__}" + (f": {text}" if text else "")
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return BackendUnavailable(message)
    return BackendError(message)


class _Guarded:
    """A backend object whose methods raise only our errors (see :func:`guard`)."""

    def __init__(self, target: object, label: str, timeout: float | None) -> None:
        self._target = target
        self._label = label
        self._timeout = timeout

    def __repr__(self) -> str:
        return f"guard({self._target!r})"

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if name.startswith("_") or not callable(attr):
            return attr  # plain attributes (scope, location, durability) are read each time
        label, timeout = self._label, self._timeout
        if name in _SYNC_METHODS:

            def call_sync(*args: Any, **kwargs: Any) -> Any:
                try:
                    return attr(*args, **kwargs)
                except _PASS_THROUGH:
                    raise
                except Exception as exc:
                    raise _fault(label, name, exc) from exc

            wrapped: Callable[..., Any] = call_sync
        else:

            async def call(*args: Any, **kwargs: Any) -> Any:
                try:
                    async with asyncio.timeout(timeout):
                        return await attr(*args, **kwargs)
                except _PASS_THROUGH:
                    raise
                except TimeoutError as exc:
                    raise BackendUnavailable(f"{label}.{name}() did not answer within {timeout:g} s") from exc
                except asyncio.CancelledError as exc:
                    task = asyncio.current_task()
                    if task is None or task.cancelling():
                        raise  # we are being cancelled: not the plugin's doing
                    raise _fault(label, name, exc) from exc  # the plugin raised it by itself
                except Exception as exc:
                    raise _fault(label, name, exc) from exc

            wrapped = call
        self.__dict__[name] = wrapped  # looked up once per method
        return wrapped


def guard(target: _T, plugin: str, side: str, timeout: float | None = None) -> _T:
    """``target`` with every method wrapped: a plugin's own exception -- ``CancelledError``
    raised by itself included -- becomes a ``BackendError`` (``BackendUnavailable`` for
    ``ConnectionError``/``TimeoutError``, and for a call that does not answer within
    ``timeout`` seconds) that names the plugin and the method, with the original chained.
    Our own errors pass unchanged."""
    return cast(_T, _Guarded(target, f"the {plugin!r} plugin's {side}", timeout))


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait for ``event`` at most ``timeout`` seconds; True if it is set.

    (``asyncio.wait_for`` on 3.11 can swallow a cancellation that races with the
    result, which would make a background loop ignore shutdown.)
    """
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True


class Backoff:
    """Every "the backend failed: wait, then try again" decision of one serving loop.

    ``BackendUnavailable`` (an outage, a failover, a locked file) pauses the caller as
    long as it lasts: the first one logs a warning, the first success after it logs how
    long the pause was; waits grow from 0.2 s to 5 s. Any other ``BackendError`` is a
    fault that waiting rarely cures (a plugin bug, refused credentials, a corrupt file):
    the same operation is tried :attr:`FAULT_TRIES` times in all, then the error is
    raised and the loop stops. Waits end early when ``stop`` is set.
    """

    FAULT_TRIES = 3
    MAX_WAIT = 5.0

    def __init__(self, name: str, stop: asyncio.Event) -> None:
        self.name = name
        self.stop = stop
        self.down_since: float | None = None
        self._faults: dict[str, int] = {}

    @property
    def paused(self) -> bool:
        return self.down_since is not None

    async def failed(self, exc: BackendError, operation: str) -> None:
        """Wait before ``operation`` is tried again, or raise ``exc`` when it is a fault tried too often."""
        now = time.monotonic()
        if isinstance(exc, BackendUnavailable):
            if self.down_since is None:
                self.down_since = now
                log.warning("%s: backend unreachable, pausing: %s", self.name, exc)
            wait = min(self.MAX_WAIT, 0.2 + (now - self.down_since))
        else:
            faults = self._faults[operation] = self._faults.get(operation, 0) + 1
            if faults >= self.FAULT_TRIES:
                raise exc
            log.error("%s: %s failed (try %d of %d): %s", self.name, operation, faults, self.FAULT_TRIES, exc)
            wait = 0.1 * 2**faults
        await wait_event(self.stop, wait)

    def ok(self, operation: str) -> None:
        """``operation`` succeeded."""
        if self._faults:
            self._faults.pop(operation, None)
        if self.down_since is not None:
            log.warning(
                "%s: backend reachable again after %.1f s; resuming", self.name, time.monotonic() - self.down_since
            )
            self.down_since = None


class Store:
    """The queue and done set of one loop, built from its settings (no I/O until :meth:`open`)."""

    def __init__(self, name: str, settings: Settings, call_timeout: float | None = None) -> None:
        """``call_timeout``: the longest any backend call may take (default: twice the lease
        timeout, at least 60 s -- beyond it this worker's leases are gone anyway)."""
        self.name = name
        self.settings = settings
        if call_timeout is None:
            call_timeout = max(60.0, 2 * float(settings.loop["lease_timeout"]))
        qspec, dspec = settings.queue.spec(), settings.done.spec()
        assert qspec.create_queue is not None and dspec.create_done_set is not None
        try:
            raw_queue = qspec.create_queue(name, dict(settings.queue.options))
            raw_done = dspec.create_done_set(name, dict(settings.done.options))
        except _PASS_THROUGH:
            raise
        except Exception as exc:
            raise _fault(f"the {qspec.plugin or qspec.name!r} plugin's", "create", exc) from exc
        self.raw_queue, self.raw_done = raw_queue, raw_done  # unguarded: for their attributes only
        self.queue: QueueBackend = guard(raw_queue, qspec.plugin or qspec.name, "queue", call_timeout)
        self.done: DoneSetBackend = guard(raw_done, dspec.plugin or dspec.name, "done set", call_timeout)
        self.registry: WorkerRegistry | None = (
            cast(WorkerRegistry, self.queue) if isinstance(raw_queue, WorkerRegistry) else None
        )
        self.notifier: Notifier | None = cast(Notifier, self.queue) if isinstance(raw_queue, Notifier) else None
        self.counters: CounterStore | None = (
            cast(CounterStore, self.queue) if isinstance(raw_queue, CounterStore) else None
        )
        self.host_slots: HostSlots | None = (
            cast(HostSlots, self.queue) if isinstance(raw_queue, HostSlots) else None
        )
        self.expiring: ExpiringDoneSet | None = (
            cast(ExpiringDoneSet, self.done) if isinstance(raw_done, ExpiringDoneSet) else None
        )
        if settings.loop.get("done_ttl") is not None and self.expiring is None:
            raise ConfigError(
                f"done_ttl is set ({settings.sources.get('done_ttl', 'option')}) but the {settings.done.backend!r} "
                "done set cannot expire names (it does not implement ExpiringDoneSet); unset done_ttl or use "
                "a done set that can (memory, sqlite, redis)"
            )
        q_scope, d_scope = raw_queue.scope, raw_done.scope
        if SCOPE_ORDER[q_scope] > SCOPE_ORDER[d_scope] and not settings.loop["allow_local"]:
            raise ConfigError(
                f"the queue ({settings.queue.backend}, scope {q_scope}) is shared more widely than the done set "
                f"({settings.done.backend}, scope {d_scope}): workers elsewhere would not see done names. "
                "Use the same backend for both, or set allow_local = true in [loop]"
            )
        self.shared: bool = bool(self.queue.shares_done_set(raw_done))
        self.opened = False
        self._notify: asyncio.Future[None] | None = None

    async def wait_for_tasks(self, local: asyncio.Event, timeout: float) -> None:
        """Sleep until ``local`` is set, the backend says tasks may be ready, or ``timeout``.

        The backend's wait outlives one call (at most :data:`NOTIFY_WAIT` s): cancelling
        it every poll would, for Redis, drop the connection it blocks on.
        """
        waiter = asyncio.ensure_future(local.wait())
        waiters: list[asyncio.Future[Any]] = [waiter]
        if self.notifier is not None:
            if self._notify is None:
                self._notify = asyncio.ensure_future(self.notifier.wait_for_tasks(NOTIFY_WAIT))
            waiters.append(self._notify)
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            await asyncio.wait([waiter])
        notify = self._notify
        if notify is not None and notify.done():
            self._notify = None
            if not notify.cancelled() and notify.exception() is not None:
                log.debug("%s: waiting for tasks failed: %s", self.name, notify.exception())

    async def stop_waiting(self) -> None:
        notify, self._notify = self._notify, None
        if notify is not None:
            notify.cancel()
            await asyncio.wait([notify])
            if not notify.cancelled():
                notify.exception()  # read: a failed wait is not worth a warning at exit

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def durability(self) -> str | None:
        value = getattr(self.raw_queue, "durability", None)
        return value if isinstance(value, str) else None

    def describe(self) -> str:
        """Both sides' backends and locations, for the start line."""
        s = self.settings
        durability = self.durability
        return (
            f"queue: {s.queue.backend} at {mask_secrets(str(self.queue.location))}"
            + (f" (durability: {durability})" if durability else "")
            + f"; done set: {s.done.backend} at {mask_secrets(str(self.done.location))}"
            + ("" if self.shared else " (separate: done names are written before acks)")
        )

    def check_durability(self, required: bool) -> None:
        """``require_durable``: refuse a queue that does not report everysec or always."""
        durability = self.durability
        if required and durability not in ("everysec", "always"):
            raise ConfigError(
                f"require_durable is set but the {self.settings.queue.backend} queue at "
                f"{self.queue.location} reports durability {durability or 'of its process only'!r}"
            )

    async def has_data(self) -> bool | None:
        """Does the loop have anything on either side (tasks, dead letters, done names,
        workers)? Asked without opening, so nothing is created; None when a backend
        cannot tell (its plugin offers no ``has_data``)."""
        answers: list[bool] = []
        seen: list[tuple[str, dict[str, Any]]] = []
        for side in (self.settings.queue, self.settings.done):
            if (side.backend, side.options) in seen:
                continue
            seen.append((side.backend, side.options))
            spec = side.spec()
            if spec.has_data is None:
                return None
            try:
                answer = await spec.has_data(self.name, dict(side.options))
            except _PASS_THROUGH:
                raise
            except Exception as exc:
                raise _fault(f"the {spec.plugin or spec.name!r} plugin's", "has_data", exc) from exc
            if type(answer) is not bool:
                raise BackendError(f"the {spec.name!r} plugin's has_data() answered {_short(answer)}, not a bool")
            answers.append(answer)
        return any(answers)

    def where(self) -> str:
        """Where the loop's data lives, for messages: the queue's location, and the done set's when apart."""
        queue, done = mask_secrets(str(self.queue.location)), mask_secrets(str(self.done.location))
        q, d = self.settings.queue.backend, self.settings.done.backend
        return f"{queue} ({q})" if (q, queue) == (d, done) else f"{queue} ({q}), done set at {done} ({d})"

    async def open(self) -> None:
        if self.opened:
            return
        await self.queue.open()
        try:
            await self.done.open()
        except BaseException:
            await self.queue.close()
            raise
        self.opened = True

    async def __aenter__(self) -> Store:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self.opened:
            self.opened = False
            try:
                await self.queue.close()
            finally:
                await self.done.close()

    # -- writes ------------------------------------------------------------------------

    async def _unique_filter(self, tasks: Sequence[NewTask]) -> list[NewTask]:
        """For a done set the queue cannot see: drop unique tasks whose name is done (one batched call)."""
        unique = [t for t in tasks if t.unique and t.key is not None]
        if not unique:
            return list(tasks)
        flags = await self.done.contains([t.key for t in unique if t.key is not None])
        if len(flags) != len(unique):
            raise BackendError(f"the done set answered {len(flags)} flags for {len(unique)} names")
        skip = {id(t) for t, is_done in zip(unique, flags, strict=True) if is_done}
        return [t for t in tasks if id(t) not in skip]

    async def _write_done(self, outbox: Outbox) -> None:
        if outbox.marks:
            added, removed = outbox.split_done()
            if removed:
                await self.done.remove(removed)
            if added:
                await self.done.add(added)
            if outbox.ttls:
                await self._expiring().add_expiring(outbox.expiring())

    def _expiring(self) -> ExpiringDoneSet:
        if self.expiring is None:  # the producer refuses a ttl first; this is the last line of defence
            raise ConfigError(f"the {self.settings.done.backend!r} done set cannot expire names (task_done ttl)")
        return self.expiring

    async def write(self, outbox: Outbox) -> int:
        """Done-set changes first, then the pushes (a duplicate at worst, never a loss).

        Returns how many of the outbox's tasks were enqueued (the others were skipped as
        done or pending)."""
        await self._write_done(outbox)
        tasks: Sequence[NewTask] = outbox.tasks
        if tasks and not self.shared:
            tasks = await self._unique_filter(tasks)
        if not tasks:
            return 0
        pushed = await self.queue.push(tasks)
        return pushed if type(pushed) is int and 0 <= pushed <= len(tasks) else len(tasks)

    async def commit(self, attempts: Sequence[Attempt]) -> tuple[int, int]:
        """Ack finished attempts with their done names and children.

        Returns how many were applied, and how many of their children were enqueued
        (the others were skipped as done or pending, or belonged to a fenced commit;
        a queue without a ``children_pushed`` counter counts them all as enqueued)."""
        if self.shared:
            # (ttls come only from a producer that checked that this done set can expire names)
            commits = [
                Commit(a.lease, *a.outbox.split_done(), a.outbox.tasks, a.outbox.expiring() if a.outbox.ttls else ())
                for a in attempts
            ]
        else:
            merged = Outbox()
            for a in attempts:
                merged.add_marks(a.outbox)
            await self._write_done(merged)  # done names first: a duplicate, never a loss
            everything = [t for a in attempts for t in a.outbox.tasks]
            kept = {id(t) for t in await self._unique_filter(everything)} if everything else set()
            commits = [Commit(a.lease, children=[t for t in a.outbox.tasks if id(t) in kept]) for a in attempts]
        before = getattr(self.raw_queue, "children_pushed", None)
        applied = _count(await self.queue.commit(commits), len(commits), "commit")
        after = getattr(self.raw_queue, "children_pushed", None)
        offered = sum(len(c.children) for c in commits)
        if type(before) is int and type(after) is int and 0 <= after - before <= offered:
            return applied, after - before
        return applied, offered

    # -- leases ------------------------------------------------------------------------

    async def reserve(self, worker: str, limit: int) -> list[Lease]:
        leases = await self.queue.reserve(worker, limit)
        if type(leases) is not list or len(leases) > limit or not all(type(x) is Lease for x in leases):
            raise BackendError(f"reserve({limit}) answered {_short(leases)}, not a list of at most {limit} leases")
        return leases

    async def release(self, leases: Sequence[Lease], delay: float = 0.0) -> int:
        if delay > 0:
            return _count(await self.queue.release(leases, delay), len(leases), "release")
        return _count(await self.queue.release(leases), len(leases), "release")

    async def retry(self, items: Sequence[tuple[Lease, float]]) -> int:
        return _count(await self.queue.retry(items), len(items), "retry")

    async def bury(self, items: Sequence[tuple[Lease, str]]) -> int:
        return _count(await self.queue.bury(items), len(items), "bury")

    # -- reading -----------------------------------------------------------------------

    async def stats(self) -> QueueStats:
        stats = await self.queue.stats()
        if not isinstance(stats, QueueStats) or not all(
            type(v) is int and v >= 0 for v in (stats.ready, stats.delayed, stats.leased, stats.dead)
        ):
            raise BackendError(f"stats() answered {_short(stats)}")
        return stats

    async def done_count(self) -> int:
        n = await self.done.count()
        if type(n) is not int or n < 0:
            raise BackendError(f"the done set's count() answered {_short(n)}")
        return n

    async def dead_letters(self, limit: int) -> list[DeadLetter]:
        letters = await self.queue.dead_letters(limit)
        return [x for x in letters if type(x) is DeadLetter] if isinstance(letters, list) else []

    async def requeue_dead(self, limit: int | None) -> int:
        n = await self.queue.requeue_dead(limit)
        return n if type(n) is int else 0

    async def counts(self) -> dict[str, int] | None:
        """The loop's counters summed over every worker (None: the queue keeps none); bad entries dropped."""
        if self.counters is None:
            return None
        found = await self.counters.counts()
        if not isinstance(found, dict):
            raise BackendError(f"counts() answered {_short(found)}, not a dict")
        return {k: v for k, v in found.items() if counter_ok(k, v)}

    async def clear(self, what: str) -> None:
        if what in ("stats", "all") and self.counters is not None:
            await self.counters.clear_counts()
        if what in ("queue", "all"):
            await self.queue.clear("queue")
        if what in ("dead", "all"):
            await self.queue.clear("dead")
        if what in ("done", "all"):
            await self.done.clear()


def _count(value: Any, most: int, method: str) -> int:
    if type(value) is not int or not 0 <= value <= most:
        raise BackendError(f"{method}() answered {_short(value)} for a batch of {most}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."
