"""Serving a loop, top to bottom: reserve → run → commit, retry or bury → heartbeat → shutdown.

One :class:`Worker` is one ``serve()``. Its dispatcher reserves at most ``concurrency -
running`` tasks (no private prefetch a stop or a crash would strand) and runs each
handler in a task of its own; the committer writes finished attempts, retries, burials,
releases and the loop's outbox in coalesced batches; the heartbeat (:mod:`._presence`)
keeps the incarnation alive; the watchdog cancels handlers past ``task_timeout``.

Error boundaries, all explicit:

- a handler's exception fails its attempt only (retry with backoff, then a dead letter);
- a backend's failure goes through one :class:`~._store.Backoff`: an outage pauses the
  loop, a fault (a plugin bug, refused credentials) stops it with exit code 1 after a
  few tries;
- the background tasks are supervised: if one dies of anything, the loop logs it with
  its traceback and stops (exit code 1) instead of running on with nothing acknowledged;
- at exit, what could not be written is never dropped silently: finished tasks whose
  ack failed are released (they run again), leases come back after the lease timeout,
  and buffered adds are spilled to a local file that the next start replays.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import signal
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from ._hosts import LoopHosts, loop_hosts
from ._metrics import MetricsServer, render
from ._outbox import CURRENT, Attempt, Outbox, settle
from ._presence import NullPresence, Presence
from ._producer import HandlerTable, Producer
from ._report import ERROR_MAX, Report, RunSummary, error_text, printable
from ._spill import keep, replay
from ._stats import Stats
from ._store import Backoff, Store, wait_event
from .backend import Lease
from .codec import decode_task
from .errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    DecodeError,
    EncodeError,
    HandlerError,
    Reject,
    Retry,
    RobotsDisallowed,
    TaskTooLarge,
)
from .masking import mask_secrets

__all__ = ["Worker"]

log = logging.getLogger("achihuo_mini")

HOLD_BACK_DELAY = 2.0  # seconds a task for a handler only a live peer has waits before it is ready again
RELEASE_WAIT = 2.0  # seconds cancelled handlers get to unwind before their leases are released
BACKGROUND_WAIT = 15.0  # seconds the committer/heartbeat get to finish their call at shutdown
FINAL_WRITES = 10.0  # seconds a stop keeps trying to write what is left
UNREGISTER_WAIT = 5.0  # seconds unregistering, and closing the backends, may take at exit


_FINAL = (Reject, HandlerError, EncodeError, TaskTooLarge)
"""Failures no retry can mend: the task becomes a dead letter at once (``Reject`` raised by a
handler or by ``async_web_request``; an add the handler made that can never be stored)."""


class Worker:
    """One ``serve()`` of a loop (see the module docstring)."""

    def __init__(
        self,
        name: str,
        store: Store,
        producer: Producer,
        handlers: HandlerTable,
        options: Mapping[str, Any],
        seed: Callable[[], Awaitable[None]],
        stats: Stats,
    ) -> None:
        self.name = name
        self.store = store
        self.producer = producer
        self.handlers = handlers
        self.options = options
        self.concurrency: int = options["concurrency"]
        self._seed_fn = seed
        self.aloop = asyncio.get_running_loop()
        self.stats = stats
        self.report = Report(name, stats)
        self.stop_event = asyncio.Event()
        self.wake = asyncio.Event()
        self.flush_wanted = asyncio.Event()
        self.beat_now = asyncio.Event()
        self.closed = asyncio.Event()
        self.backoff = Backoff(name, self.stop_event)
        self.presence: Presence | NullPresence = (
            Presence(name, store.registry, options["lease_timeout"], options["heartbeat_interval"])
            if store.registry is not None
            else NullPresence(name)
        )
        self.role = "master"
        self.stopping = self.force = self.closing = self.seeding = False
        self.running: dict[asyncio.Task[None], Attempt] = {}
        self.known: set[int] = set()  # task ids of the leases this incarnation holds and knows of
        self.strays_due = False  # compare the backend's leases with ours before the next reserve
        self.commits: list[Attempt] = []
        self.retries: list[tuple[Lease, float]] = []
        self.burials: list[tuple[Lease, str]] = []
        self.releases: list[Lease] = []
        self.held: list[Lease] = []  # tasks for a handler only a peer has, to release with a delay
        self.holding = 0  # ... counted against concurrency until they were ready again for a while
        self.end: tuple[Any, int] | None = None  # what the loop holds at the end, for the summary
        self.metrics: MetricsServer | None = None
        self._ok_keys: dict[str, str] = {}  # handler -> its "handler/<name>/ok" counter
        self.hosts: LoopHosts | None = None  # per-host limits for the whole loop, when the queue can

    # -- the whole serve ---------------------------------------------------------------

    async def run(self, *, slave: bool, seed: bool, idle_exit: float | None, handle_signals: bool) -> RunSummary:
        self.role = "slave" if slave else "master"
        installed = self._install_signals() if handle_signals else []
        seeder: asyncio.Task[None] | None = None
        background: list[asyncio.Task[None]] = []
        self.producer.serving = self
        self.producer.cache.clear()  # a new incarnation starts from what the backend says
        try:
            await self.store.open()
            self.report.log_start(self.role, self.concurrency, self.store)
            self.hosts = loop_hosts(self.name, self.store, self.options, lambda: self.presence.worker)
            self.store.check_durability(self.options["require_durable"])
            if self.options["metrics"]:
                self.metrics = MetricsServer(self.options["metrics"], self._metrics_page)
                await self.metrics.start()
            await replay(self.name, self.store)
            await self.producer.flush()  # what was added before serve() started
            self.report.log_holdings(await self.report.look(self.store))
            self.seeding = not slave and seed
            self.report.summary.alias = await self.presence.start(self.role, self.info())
            self.stats.add("runs/started")
            self.stats.stamp()
            if self.seeding:
                seeder = asyncio.create_task(self._seed(), name=f"{self.name}-seed")
            background = [
                self._spawn(self._committer(), "committer"),
                self._spawn(self.presence.run(self, self.beat_now, lambda: self.closing, self.backoff), "heartbeat"),
                self._spawn(self._watchdog(), "watchdog"),
            ]
            if self.store.counters is not None and self.options["stats"]:
                background.append(self._spawn(self._publisher(), "stats publisher"))
            if self.options["progress_interval"]:
                progress = self.report.progress(
                    self.store, self.options["progress_interval"], lambda: len(self.running), self.closed
                )
                background.append(self._spawn(progress, "progress reporter"))
            await self._dispatch(idle_exit, seeder)
        except (BackendError, ConfigError) as exc:
            log.error("%s: %s", self.name, exc)
            self.report.fail(str(exc))
        except Exception as exc:
            log.error("%s: the dispatcher failed; stopping", self.name, exc_info=exc)
            self.report.fail(f"dispatcher: {type(exc).__name__}: {exc}")
        finally:
            await self._shutdown(seeder, background)
            for sig in installed:
                self.aloop.remove_signal_handler(sig)
            self.producer.serving = None
            self.report.log_summary(self.end)
        return self.report.summary

    def _install_signals(self) -> list[int]:
        if threading.current_thread() is not threading.main_thread():
            return []
        self.aloop.add_signal_handler(signal.SIGTERM, self.stop)
        self.aloop.add_signal_handler(signal.SIGINT, self.interrupt)
        return [signal.SIGTERM, signal.SIGINT]

    def _spawn(self, coro: Awaitable[None], what: str) -> asyncio.Task[None]:
        """A supervised background task: if it dies, the loop logs why and stops with exit code 1."""
        task = asyncio.ensure_future(coro)
        task.set_name(f"{self.name}-{what}")
        serving = asyncio.current_task()
        assert serving is not None

        def supervise(task: asyncio.Task[None]) -> None:
            if self.closing or serving.cancelling() or serving.done():  # a shutdown, or serve() itself cancelled
                if not task.cancelled() and task.exception() is not None:
                    log.error("%s: the %s failed while stopping", self.name, what, exc_info=task.exception())
                return
            exc = None if task.cancelled() else task.exception()
            if task.cancelled():
                reason = f"the {what} was cancelled"  # nobody cancels it but the shutdown
            elif exc is None:
                reason = f"the {what} stopped"
            else:
                reason = f"the {what} died: {type(exc).__name__}: {exc}"
            log.error("%s: %s; stopping", self.name, reason, exc_info=exc)
            self.report.fail(reason)
            self.stop()

        task.add_done_callback(supervise)
        return task

    async def _seed(self) -> None:
        try:
            await self._seed_fn()
            await self.producer.flush()  # seeding is over only when the seeds are written
        except asyncio.CancelledError:
            raise
        except BackendError as exc:
            if not self.stopping:
                log.error("%s: could not write what run() added: %s", self.name, exc)
                self.report.fail(str(exc))
                self.stop()
        except Exception:
            log.error("%s: run() failed; what it added is kept:\n%s", self.name, mask_secrets(traceback.format_exc()))
            self.report.fail("run() raised")
            self.stop()
        finally:
            self.seeding = False
            self.beat_now.set()  # tell the other workers at once: idleness depends on it

    # -- stopping ----------------------------------------------------------------------

    def stop(self) -> None:
        """Stop gracefully; safe from handlers, signal handlers and other threads."""
        try:
            in_loop = asyncio.get_running_loop() is self.aloop
        except RuntimeError:
            in_loop = False
        if in_loop:
            self._stop_now()
        elif not self.aloop.is_closed():
            self.aloop.call_soon_threadsafe(self._stop_now)

    def _stop_now(self) -> None:
        self.stopping = True
        self.stop_event.set()
        self.wake.set()

    def interrupt(self) -> None:
        """SIGINT: a graceful stop; a second one skips the grace period."""
        if self.stopping:
            log.warning("%s: second interrupt: skipping the grace period", self.name)
            self.force = True
        self.stop()

    # -- presence hooks ----------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        if self.stopping:
            state = "stopping"
        elif self.backoff.paused:
            state = "paused"
        else:
            state = "seeding" if self.seeding else "running"
        return self.report.info(
            self.role, state, self.concurrency, len(self.running), self.seeding, sorted(self.handlers.names)
        )

    def command(self, command: str) -> None:
        if command == "stop":
            log.info("%s: stop command received", self.name)
            self.stop()
        else:
            log.warning("%s: ignoring unknown command %r", self.name, mask_secrets(command)[:60])

    def leases_lost(self) -> None:
        """The incarnation is gone: its handlers' leases are someone else's now."""
        for task, attempt in self.running.items():
            if attempt.cancel_reason is None:
                attempt.cancel_reason = "lost"
                task.cancel()
        self.known.clear()

    def check_leases(self) -> None:
        self.strays_due = True
        self.wake.set()  # also a dispatcher waiting for a free slot

    # -- the dispatcher ----------------------------------------------------------------

    async def _dispatch(self, idle_exit: float | None, seeder: asyncio.Task[None] | None) -> None:
        """Reserve → run (→ the committer acks) until a stop or global idleness."""
        idle_since: float | None = None
        poll = 0.01
        task_timeout = float(self.options["task_timeout"])
        while not self.stopping:
            free = self.concurrency - len(self.running) - self.holding
            if free <= 0 and not self.strays_due:
                self.wake.clear()
                await self.wake.wait()
                continue
            try:
                if self.strays_due:  # here, so that no reserve is in flight meanwhile
                    await self._release_strays()
                    if free <= 0:
                        continue
                leases = await self.store.reserve(self.presence.worker, free)
            except BackendError as exc:
                if isinstance(exc, BackendUnavailable):
                    self.strays_due = True  # it may have leased tasks whose reply we lost
                await self.backoff.failed(exc, "reserve")
                continue
            self.backoff.ok("reserve")
            if leases:
                idle_since = None
                poll = 0.01
                deadline = self.aloop.time() + task_timeout
                for lease in leases:
                    self._start(lease, deadline)
                await asyncio.sleep(0)  # let handlers that finish at once free their slots
                continue
            if idle_exit is not None and not self.running and self._quiet(seeder):
                try:
                    idle = await self._globally_idle()
                except BackendError as exc:
                    await self.backoff.failed(exc, "idle check")
                    continue
                if idle:
                    now = time.monotonic()
                    idle_since = idle_since or now
                    if now - idle_since >= idle_exit:
                        log.info("%s: the queue is idle; stopping", self.name)
                        self.report.summary.reason = "idle"
                        return
                else:
                    idle_since = None
            self.wake.clear()
            await self.store.wait_for_tasks(self.wake, min(poll, 1.0))
            poll = min(poll * 2, 0.5)

    def _quiet(self, seeder: asyncio.Task[None] | None) -> bool:
        """Nothing of this process is unwritten or still seeding."""
        p = self.producer
        return not (
            p.outbox or p.writing or self.commits or self.retries or self.burials or self.releases or self.holding
        ) and (seeder is None or seeder.done())

    async def _globally_idle(self) -> bool:
        stats = await self.store.stats()
        return not stats.active and not await self.presence.others_seeding()

    async def _release_strays(self) -> None:
        """Give back leases the backend says this incarnation holds but it does not run
        (a reserve whose reply was lost; a backend that lost writes and restored old leases)."""
        held = await self.presence.leases()
        stray = [lease for lease in held if lease.task_id not in self.known]
        if stray:
            n = await self.store.release(stray)
            log.warning("%s: released %d leases this worker held but did not run", self.name, n)
        self.strays_due = False

    # -- attempts ----------------------------------------------------------------------

    def _start(self, lease: Lease, deadline: float) -> None:
        self.known.add(lease.task_id)
        attempt = Attempt(self.producer, lease, deadline=deadline)
        task = self.aloop.create_task(self._attempt(attempt))
        self.running[task] = attempt
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.running.pop(task, None)
        self.wake.set()

    async def _attempt(self, attempt: Attempt) -> None:
        try:
            await self._run_attempt(attempt)
        except Exception as exc:  # a bug of ours, never the handler's: loud, and the lease comes back
            log.error("%s: running task %s failed unexpectedly", self.name, attempt.lease.task_id, exc_info=exc)
            self.releases.append(attempt.lease)
            self.kick()

    async def _run_attempt(self, attempt: Attempt) -> None:
        lease = attempt.lease
        try:
            decoded = decode_task(lease.payload, self.producer.max_task_size)
        except DecodeError as exc:
            log.error("%s: burying undecodable task %s: %s", self.name, lease.task_id, exc)
            self._bury(lease, f"undecodable: {exc}")
            return
        attempt.handler, attempt.name = decoded.handler, decoded.name
        handler = self.handlers.resolve(decoded.handler)
        if handler is None:
            await self._no_handler(attempt, decoded.handler)
            return
        CURRENT.set(attempt)
        try:
            try:
                try:
                    call = handler(*decoded.args)
                except TypeError as exc:  # the arguments do not fit its signature: no retry can mend that
                    self._fail(attempt, exc, f"the arguments do not fit handler {decoded.handler!r}")
                    return
                await call
            finally:
                attempt.closed = True
        except asyncio.CancelledError:
            self._cancelled(attempt)
            return
        except Exception as exc:
            self._fail(attempt, exc)
            return
        self.commits.append(attempt)
        self.kick()

    async def _no_handler(self, attempt: Attempt, handler: str) -> None:
        lease = attempt.lease
        if not self.handlers.impossible(handler):
            peer = await self.presence.peer_handles(handler)
            if peer is not False:  # a rolling deploy (or no answer from the registry): a peer may have it
                self.held.append(lease)
                self.holding += 1
                self.kick()
                return
            why = f"unknown handler {handler!r}"
        else:
            why = f"unknown handler {handler!r} (no loop can have a handler of that name)"
        log.error("%s: burying task %r: %s", self.name, mask_secrets(str(attempt.name)), why)
        self._bury(lease, why)

    def _cancelled(self, attempt: Attempt) -> None:
        reason = attempt.cancel_reason
        if reason == "timeout":
            self._fail(
                attempt, TimeoutError(f"handler ran longer than task_timeout ({self.options['task_timeout']} s)")
            )
            return
        self.producer.cache.written([attempt.outbox], learn=False)  # discarded
        if reason == "lost":
            return  # the lease is another incarnation's now: nothing to give back
        task = asyncio.current_task()
        if reason == "stop" or (task is not None and task.cancelling()):
            self.releases.append(attempt.lease)  # to the queue head; the outbox is discarded
            self.kick()
            return
        # nothing cancelled it: the handler raised CancelledError itself (it awaited
        # something that was cancelled) -- a failure like any other, or it would cycle for ever
        self._fail(attempt, asyncio.CancelledError("the handler raised CancelledError (no stop, no task_timeout)"))

    def _fail(self, attempt: Attempt, exc: BaseException, final: str | None = None) -> None:
        """Retry the task with backoff, or bury it: after its last retry, or at once when no
        retry can mend the failure (``final`` says why, or ``exc`` is one of :data:`_FINAL`)."""
        self.producer.cache.written([attempt.outbox], learn=False)
        lease = attempt.lease
        name = printable(f"{attempt.handler}({mask_secrets(attempt.name) if attempt.name is not None else None!r})")
        if isinstance(exc, RobotsDisallowed):  # acked with nothing written: never retried, never a dead letter
            log.debug("%s: task %s: %s", self.name, name, exc)
            self.report.task("disallowed", attempt.handler)
            attempt.outbox, attempt.disallowed = Outbox(), True
            self.commits.append(attempt)
            self.kick()
            return
        self.report.task("failed", attempt.handler)
        failures = lease.failures if type(lease.failures) is int and lease.failures >= 0 else 0
        hopeless = final is not None or isinstance(exc, _FINAL)
        if hopeless or failures >= self.handlers.retries(attempt.handler, self.options["max_retries"]):
            shown = not isinstance(exc, (Retry, Reject))  # raised on purpose: the reason says it all
            error = error_text(exc, shown, final or "")
            log.error(  # the one place a handler's traceback is logged: once per task, not per retry
                "%s: task %s is now a dead letter (%s): %s%s",
                self.name,
                name,
                "no retry can mend it" if hopeless else f"failed {failures + 1} times",
                error.split("\n")[0],
                "\n" + mask_secrets("".join(traceback.format_exception(exc))).rstrip() if shown else "",
            )
            self._bury(lease, error, attempt.handler)
            return
        delay = self._retry_delay(failures, exc)
        log.warning("%s: task %s failed (retry in %.1f s): %s", self.name, name, delay, error_text(exc, False))
        self.retries.append((lease, delay))
        self.report.task("retried")
        self.kick()

    def _retry_delay(self, failures: int, exc: BaseException) -> float:
        """The one retry policy: ``Retry(delay=…)`` if given, else exponential backoff with jitter."""
        if isinstance(exc, Retry) and exc.delay is not None:
            try:
                delay = float(exc.delay)
            except (TypeError, ValueError):
                delay = 0.0
            return min(delay, 1e9) if math.isfinite(delay) and delay > 0 else 0.0
        base = self.options["retry_delay"] * 2 ** min(failures, 64)
        return float(min(self.options["retry_max_delay"], base) * random.uniform(0.5, 1.0))

    def _bury(self, lease: Lease, reason: str, handler: str = "") -> None:
        self.burials.append((lease, mask_secrets(reason)[:ERROR_MAX]))
        self.report.task("dead", handler)
        self.kick()

    def kick(self) -> None:
        if not self.flush_wanted.is_set():
            self.flush_wanted.set()

    def written(self, offered: int, pushed: int) -> None:
        self.report.written(offered, pushed, outside=True)

    async def _watchdog(self) -> None:
        """Cancel handlers running past ``task_timeout`` (one timer for all, not one per task)."""
        interval = min(1.0, self.options["task_timeout"] / 4)
        while not self.closing:
            await wait_event(self.closed, interval)
            now = self.aloop.time()
            for task, attempt in list(self.running.items()):
                if attempt.deadline <= now and attempt.cancel_reason is None and not attempt.closed:
                    attempt.cancel_reason = "timeout"
                    task.cancel("task_timeout")

    # -- the committer -----------------------------------------------------------------

    async def _committer(self) -> None:
        """Write finished attempts, retries, burials, releases and the loop's outbox in batches."""
        interval = self.options["flush_interval"]
        while not self.closing:
            await wait_event(self.flush_wanted, interval)
            if self.closing:
                return
            self.flush_wanted.clear()
            await asyncio.sleep(0)  # coalesce handlers finishing in the same tick
            try:
                await self._write_batch()
            except BackendError as exc:
                await self.backoff.failed(exc, "write")
                self.flush_wanted.set()
                continue
            self.backoff.ok("write")

    async def _write_batch(self) -> None:
        """One round of writes. What fails is put back, so a later round retries it."""
        store, report = self.store, self.report
        if self.commits:
            attempts, self.commits = self.commits, []
            settle(self.producer.outbox, [a.outbox for a in attempts])  # written after them: later calls win
            try:
                applied, pushed = await store.commit(attempts)
            except BaseException:
                self.commits[:0] = attempts
                raise
            self.known.difference_update(a.lease.task_id for a in attempts)
            self.producer.cache.written([a.outbox for a in attempts], learn=applied == len(attempts))
            disallowed = sum(a.disallowed for a in attempts)
            report.task("ok", n=max(applied - disallowed, 0))
            if applied == len(attempts):
                keys, counts = self._ok_keys, self.stats.counts
                for a in attempts:
                    if a.disallowed:
                        continue
                    key = keys.get(a.handler)
                    if key is None:
                        key = keys[a.handler] = self.stats.bounded_key("handler", f"{a.handler}/ok")
                    counts[key] = counts.get(key, 0) + 1
            report.written(sum(len(a.outbox.tasks) for a in attempts), pushed, outside=False)
            if applied < len(attempts):
                report.task("fenced", n=len(attempts) - applied)
                log.warning("%s: %d commits were fenced (their lease was lost)", self.name, len(attempts) - applied)
        if self.retries:
            items, self.retries = self.retries, []
            await self._lease_write(store.retry(items), items, lambda: self.retries)
        if self.burials:
            buried, self.burials = self.burials, []
            await self._lease_write(store.bury(buried), buried, lambda: self.burials)
        if self.releases:
            released, self.releases = self.releases, []
            report.task("released", n=await self._lease_write(store.release(released), released, lambda: self.releases))
        if self.held:
            held, self.held = self.held, []
            await self._lease_write(store.release(held, HOLD_BACK_DELAY), held, lambda: self.held)
            # their slots stay taken until the tasks were ready for a while: long enough for the
            # peer that has the handler to take them, instead of this worker taking them again
            self.aloop.call_later(2 * HOLD_BACK_DELAY, self._unhold, len(held))
        if self.producer.outbox:
            await self.producer.flush_once()

    def _unhold(self, n: int) -> None:
        self.holding -= n
        self.wake.set()

    async def _lease_write(self, call: Awaitable[int], items: list[Any], pending: Callable[[], list[Any]]) -> int:
        try:
            n = await call
        except BaseException:
            pending()[:0] = items
            raise
        self.known.difference_update((item if isinstance(item, Lease) else item[0]).task_id for item in items)
        return n

    # -- statistics --------------------------------------------------------------------

    async def _publisher(self) -> None:
        """Add what this worker counted to the loop's totals, every heartbeat interval."""
        while not await wait_event(self.closed, self.options["heartbeat_interval"]):
            await self._publish()

    async def _publish(self) -> None:
        """One ``add_counts`` of what changed. An outage keeps it for the next time; a backend
        that refuses it costs the statistics only (a warning), never the loop."""
        counters = self.store.counters
        if counters is None or not self.options["stats"]:
            return
        self.stats.stamp()
        delta = self.stats.delta()
        if not delta:
            return
        try:
            await counters.add_counts(delta)
        except BackendUnavailable:
            return  # kept: the next call sends it
        except BackendError as exc:
            log.warning("%s: the backend refused this worker's statistics (%d counters dropped): %s",
                        self.name, len(delta), exc)  # fmt: skip
        self.stats.sent(delta)

    async def _metrics_page(self) -> bytes:
        """``/metrics`` of this worker: its counters, the queue's counts, its running handlers."""
        gauges: dict[str, Any] = {"running": len(self.running)}
        try:
            async with asyncio.timeout(2.0):
                gauges["queue"] = await self.store.stats()
                gauges["done"] = await self.store.done_count()
        except (BackendError, TimeoutError):
            pass  # the counters still show; the queue's gauges come back with the backend
        return render(self.name, self.presence.alias or "-", self.stats.view(), gauges)

    # -- shutdown ----------------------------------------------------------------------

    async def _shutdown(self, seeder: asyncio.Task[None] | None, background: list[asyncio.Task[None]]) -> None:
        self._stop_now()
        if seeder is not None and not seeder.done():
            seeder.cancel()
            await asyncio.wait([seeder])
        if self.running:
            grace = 0.0 if self.force else float(self.options["grace_period"])
            log.info("%s: stopping; %d handlers running get %.1f s to finish", self.name, len(self.running), grace)
            await self._wait_running(grace)
        if self.running:
            log.warning(
                "%s: cancelling %d handlers; their tasks go back to the queue head", self.name, len(self.running)
            )
            for task, attempt in list(self.running.items()):
                attempt.cancel_reason = attempt.cancel_reason or "stop"
                task.cancel()
            await asyncio.wait(list(self.running), timeout=RELEASE_WAIT)
        await self.store.stop_waiting()
        # the committer and the heartbeat finish the call they are in (a write cut off
        # mid-flight would be repeated and show up as fenced), then end
        self.closing = True
        self.closed.set()
        self.flush_wanted.set()
        self.beat_now.set()
        if background:
            _, late = await asyncio.wait(background, timeout=BACKGROUND_WAIT)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        try:
            if self.store.opened:
                await self._final_writes()
                self.end = await self.report.look(self.store) if self.report.summary.exit_code == 0 else None
                self.stats.add_bounded("runs/finished", self.report.summary.reason or "stopped")
                try:
                    async with asyncio.timeout(UNREGISTER_WAIT):
                        await self._publish()
                except TimeoutError:
                    log.warning("%s: the last statistics of this worker were not published (no answer)", self.name)
                try:
                    async with asyncio.timeout(UNREGISTER_WAIT):
                        await self.presence.stop()
                except (BackendError, TimeoutError) as exc:
                    log.error("%s: could not unregister (the registry forgets this worker after the lease timeout): %s",
                              self.name, exc or "no answer")  # fmt: skip
                    self.report.fail(f"could not unregister: {exc or 'no answer'}")
            elif self.producer.outbox:  # it never opened: what was added before serve() waits in a file
                keep(self.name, self.producer.take_unwritten())
        finally:
            for task in self.running:
                log.error("%s: handler %s did not stop; its lease comes back after the lease timeout", self.name, task)
            self.running.clear()
            if self.metrics is not None:
                await self.metrics.close()
            if self.hosts is not None:
                try:  # give back per-host slots now (else they expire after the lease timeout)
                    async with asyncio.timeout(UNREGISTER_WAIT):
                        await self.hosts.close()
                except TimeoutError:
                    log.warning("%s: giving back per-host slots took too long (they expire by themselves)", self.name)
            try:
                async with asyncio.timeout(UNREGISTER_WAIT):
                    await self.store.close()
            except (BackendError, TimeoutError) as exc:
                log.warning("%s: closing the backends failed: %s", self.name, exc or "no answer")

    async def _wait_running(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        while self.running and not self.force:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self.wake.clear()
            if not await wait_event(self.wake, remaining):
                return

    async def _final_writes(self) -> None:
        """Write what is left, for at most FINAL_WRITES seconds; never drop anything silently."""
        error: BackendError | None = None
        try:
            async with asyncio.timeout(FINAL_WRITES):
                while True:
                    try:
                        return await self._write_batch()
                    except BackendUnavailable as exc:  # an outage: keep trying until the deadline
                        error = exc
                        await asyncio.sleep(0.5)
                    except BackendError as exc:
                        error = exc
                        break
        except TimeoutError:
            error = error or BackendUnavailable(f"the backend did not answer within {FINAL_WRITES:g} s")
        assert error is not None
        log.error("%s: could not write before exiting: %s", self.name, error)
        self.report.fail(f"could not write before exiting: {error}")
        lost = [a.lease for a in self.commits]
        down = isinstance(error, BackendUnavailable)
        if lost and not down:
            try:  # a commit the backend refuses: give the tasks back, they run again (never lost)
                async with asyncio.timeout(FINAL_WRITES):
                    await self.store.release(lost)
                log.error("%s: %d finished tasks went back to the queue unacknowledged", self.name, len(lost))
                lost = []
            except (BackendError, TimeoutError):
                pass
        held = len(lost) + len(self.retries) + len(self.burials) + len(self.releases) + len(self.held)
        if held:
            log.error("%s: %d leases come back after the lease timeout (finished tasks among them run again)",
                      self.name, held)  # fmt: skip
        if self.producer.outbox and not down:
            try:
                async with asyncio.timeout(FINAL_WRITES):
                    await self.producer.flush_once()
            except (BackendError, TimeoutError):
                pass
        if self.producer.outbox:
            keep(self.name, self.producer.take_unwritten())
