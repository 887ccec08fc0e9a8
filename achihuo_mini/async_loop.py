"""``AsyncLoop``: the task loop a crawler subclasses.

::

    class SomeSpider(AsyncLoop):
        NAME = 'Some_spider'

        def __init__(self):
            super().__init__(concurrency=10, cache_backend='redis')

        async def run(self):                     # master only: seed the first tasks
            self.add_task('get_page', Item(url='https://example.com/'), task_name='https://example.com/')

        async def get_page(self, item):          # a handler: a public coroutine method
            resp = await self.async_web_request(item)
            ...
            self.task_done(item.url)

    if __name__ == '__main__':
        SomeSpider().start()                     # start | start -s | stop m1 | status | clear

The loop reads top to bottom (:meth:`AsyncLoop.serve`): reserve a batch (at most
``concurrency - running``) → run each handler as its own task → commit finished
attempts in coalesced batches (ack + done names + children in one backend call),
retry or bury failures → heartbeat. A task leaves the queue only when its handler
returns; what a handler adds is written together with its ack, so a crash never
loses a task and a retry never duplicates children.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import inspect
import itertools
import logging
import os
import random
import signal
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .backend import (
    SCOPE_ORDER,
    Commit,
    DoneSetBackend,
    Lease,
    NewTask,
    Notifier,
    QueueBackend,
    QueueStats,
    WorkerRegistry,
)
from .codec import decode_task, encode_task, name_key
from .config import DEFAULT_CACHE_BACKEND, Settings, load_settings
from .errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    DecodeError,
    HandlerError,
    Retry,
)
from .item import Item

__all__ = ["DEFAULT_CACHE_BACKEND", "AsyncLoop", "RunSummary", "Task"]

log = logging.getLogger("achihuo_mini")

_ATTEMPT: contextvars.ContextVar[_Attempt | None] = contextvars.ContextVar("achihuo_attempt", default=None)

_RELEASE_WAIT = 2.0  # seconds cancelled handlers get to unwind before their leases are released
_BULK_CHUNK = 1000
_PARK_DELAY = 2.0  # seconds a task for a handler only a peer has is held before it goes back
_NOTIFY_WAIT = 5.0  # seconds one backend wait for new tasks may block (local events wake us sooner)
_BACKGROUND_WAIT = 15.0  # seconds the committer/heartbeat get to finish their call at shutdown


@dataclass(frozen=True)
class Task:
    """One task for :meth:`AsyncLoop.add_tasks`; the arguments mean what they mean in ``add_task``."""

    generator_name: str
    args: tuple[Any, ...]
    task_name: str | None = None
    repeat: bool = True
    priority: bool | int = False
    delay: float | None = None

    def __init__(
        self,
        generator_name: str,
        *args: Any,
        task_name: str | None = None,
        repeat: bool = True,
        priority: bool | int = False,
        delay: float | None = None,
    ) -> None:
        object.__setattr__(self, "generator_name", generator_name)
        object.__setattr__(self, "args", args)
        object.__setattr__(self, "task_name", task_name)
        object.__setattr__(self, "repeat", repeat)
        object.__setattr__(self, "priority", priority)
        object.__setattr__(self, "delay", delay)


@dataclass
class RunSummary:
    """What one :meth:`AsyncLoop.serve` did. ``exit_code`` follows the command line's rules."""

    alias: str | None = None
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    buried: int = 0
    released: int = 0
    fenced: int = 0
    added: int = 0  # tasks handed to the backend, from handlers and elsewhere (it may still skip repeat=False ones)
    deduplicated: int = 0  # repeat=False adds the local dedup cache skipped without a round trip
    elapsed: float = 0.0
    exit_code: int = 0
    reason: str = ""


class _Outbox:
    """Buffered writes: tasks to push and done-set changes (last change of a name wins).

    ``names`` (the done-set changes by name) and ``unique`` (names pushed with
    ``repeat=False``) are what the local dedup cache learns once the writes succeed.
    """

    __slots__ = ("done", "names", "tasks", "unique")

    def __init__(self) -> None:
        self.tasks: list[NewTask] = []
        self.done: dict[bytes, bool] = {}
        self.names: dict[str, bool] = {}
        self.unique: list[str] = []

    def __bool__(self) -> bool:
        return bool(self.tasks or self.done)

    def add(self, tasks: Sequence[NewTask]) -> None:
        """Buffer one call's tasks so that the buffer behaves like one push per call:
        the head tasks of a newer call go before those of older calls (each call's in its own order)."""
        head = [t for t in tasks if t.head and not t.delay]
        if head:
            self.tasks[0:0] = head
            self.tasks.extend(t for t in tasks if not (t.head and not t.delay))
        else:
            self.tasks.extend(tasks)

    def take(self) -> _Outbox:
        taken = _Outbox()
        taken.tasks, self.tasks = self.tasks, []
        taken.done, self.done = self.done, {}
        taken.names, self.names = self.names, {}
        taken.unique, self.unique = self.unique, []
        return taken

    def put_back(self, newer: _Outbox) -> None:
        """After a failed write: keep this (older) outbox's writes and add the newer ones after them."""
        self.tasks.extend(newer.tasks)
        self.done.update(newer.done)
        self.names.update(newer.names)
        self.unique.extend(newer.unique)

    def split_done(self) -> tuple[list[bytes], list[bytes]]:
        """``(done, undone)`` keys, in one pass (most outboxes hold one done name and nothing else)."""
        done: list[bytes] = []
        undone: list[bytes] = []
        for k, v in self.done.items():
            (done if v else undone).append(k)
        return done, undone


@dataclass
class _Attempt:
    loop: AsyncLoop
    lease: Lease
    handler: str
    outbox: _Outbox = field(default_factory=_Outbox)
    name: str | None = None  # the task's name, once decoded
    closed: bool = False  # the handler ended: later adds (from tasks it spawned) go to the loop's outbox
    deadline: float = 0.0  # event-loop time after which the watchdog cancels it (task_timeout)
    timed_out: bool = False


async def _wait(event: asyncio.Event, timeout: float) -> bool:
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


def _masked(text: str | None) -> str | None:
    """Task names are often URLs and errors quote them: no password goes to a log or a dead letter."""
    if text is None:
        return None
    from .http import mask_secrets

    return mask_secrets(text)


def _handler_names(cls: type) -> frozenset[str]:
    """Public coroutine methods a subclass defines (nothing ``AsyncLoop`` itself defines)."""
    names = set()
    for name in dir(cls):
        if name.startswith("_") or hasattr(AsyncLoop, name):
            continue
        if inspect.iscoroutinefunction(getattr(cls, name, None)):
            names.add(name)
    return frozenset(names)


class AsyncLoop:
    """Base class of a crawler: subclass it, set ``NAME``, write coroutine handlers.

    Parameters (all optional; ``None`` means "from the config file, else the default"):

    concurrency
        Handlers running at once in this process (default 10).
    cache_backend
        Backend name for both the queue and the done set (default ``'sqlite'``:
        embedded and durable). ``[queue]``/``[done]`` sections of the config file
        override it per side.
    debug
        Verbose logging (default True). asyncio debug mode only via ``PYTHONASYNCIODEBUG=1``.
    config_file
        A TOML file (see :mod:`achihuo_mini.config`); else ``$ACHIHUO_CONFIG``.
    queue_backend
        Backend of the queue side only (seed-era keyword).
    **options
        Loop options: ``grace_period`` (8 s), ``lease_timeout`` (30 s),
        ``heartbeat_interval`` (10 s), ``task_timeout`` (600 s), ``max_retries`` (3),
        ``retry_delay`` (1 s), ``retry_max_delay`` (300 s), ``idle_exit`` (None),
        ``flush_interval`` (0.1 s), ``progress_interval`` (60 s), ``allow_local``,
        ``require_durable``, ``log_level``, ``user_agent``, ``request_timeout``,
        ``max_body_size``, ``per_host_limit``, ``per_host_delay``.

    Class attributes: ``NAME`` (required, the loop's namespace), ``HANDLER_ALIASES``
    (``{'old_name': 'new_name'}`` for renamed handlers), ``HANDLER_MAX_RETRIES``
    (``{'handler': n}`` overrides ``max_retries`` per handler), ``HTTP_HEADERS``
    (default headers of ``async_web_request``). Override ``check_html(text)`` to
    reject bodies (a false value makes ``async_web_request`` try again).

    Unknown backends, unknown options and a bad config file raise
    :class:`~achihuo_mini.errors.ConfigError` (or ``BackendNotFound``) here.
    """

    NAME: ClassVar[str | None] = None
    HANDLER_ALIASES: ClassVar[dict[str, str]] = {}
    HANDLER_MAX_RETRIES: ClassVar[dict[str, int]] = {}
    HTTP_HEADERS: ClassVar[dict[str, str]] = {}

    def __init__(
        self,
        concurrency: int | None = None,
        cache_backend: str | None = None,
        debug: bool | None = None,
        config_file: str | os.PathLike[str] | None = None,
        *,
        queue_backend: str | None = None,
        **options: Any,
    ) -> None:
        name = type(self).NAME
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{type(self).__name__}.NAME must be a non-empty string (the loop's namespace)")
        self.name: str = name
        self._init_kwargs = dict(options, concurrency=concurrency, debug=debug)
        self._cache_backend = cache_backend
        self._queue_backend = queue_backend
        self._config_file = config_file
        self._handlers = _handler_names(type(self))
        for old, new in self.HANDLER_ALIASES.items():
            if new not in self._handlers:
                raise ConfigError(
                    f"HANDLER_ALIASES maps {old!r} to {new!r}, which is not a handler of {type(self).__name__}"
                )
        self._configure()
        # runtime state (set by serve)
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._serving = False
        self._opened = False
        self._stop_requested = False
        self._force_stop = False
        self._closing = False
        self._closed = asyncio.Event()
        self._beat_now = asyncio.Event()
        self._known: set[int] = set()  # task ids of leases this incarnation holds and knows about
        self._reserve_uncertain = False
        self._parked: list[tuple[float, Lease]] = []  # (event-loop time to release, lease)
        self._peer_handlers: set[str] = set()
        self._peers_at = float("-inf")
        self._notify_task: asyncio.Future[None] | None = None
        self._wake: asyncio.Event | None = None
        self._stop_event: asyncio.Event | None = None
        self._outbox = _Outbox()
        self._commits: list[_Attempt] = []
        self._retries: list[tuple[Lease, float]] = []
        self._burials: list[tuple[Lease, str]] = []
        self._releases: list[Lease] = []
        self._flush_wanted: asyncio.Event | None = None
        self._running: dict[asyncio.Task[None], _Attempt] = {}
        self._seeding = False
        self._worker = ""
        self.alias: str | None = None
        self._summary = RunSummary()
        self._backend_down_since: float | None = None
        self._sync_runner: asyncio.Runner | None = None
        self._sync_pair: tuple[QueueBackend, DoneSetBackend] | None = None
        self._http: Any = None
        self._dedup: dict[str, None] = {}  # the local dedup cache: names known done or pending (insertion order)
        self._dedup_since = time.monotonic()

    # -- configuration --------------------------------------------------------

    def _configure(self, cli: dict[str, Any] | None = None) -> None:
        settings = load_settings(
            kwargs=self._init_kwargs,
            cache_backend=self._cache_backend,
            queue_backend=self._queue_backend,
            config_file=self._config_file,
            cli=cli,
        )
        self.settings: Settings = settings
        self.concurrency: int = settings.loop["concurrency"]
        self.debug: bool = settings.loop["debug"]
        self._dedup_max: int = settings.loop["dedup_cache"]
        self._dedup_ttl: float = settings.loop["dedup_cache_ttl"]
        self._queue, self._done = self._make_backends()
        q, d = self._queue, self._done
        if SCOPE_ORDER[q.scope] > SCOPE_ORDER[d.scope] and not settings.loop["allow_local"]:
            raise ConfigError(
                f"the queue ({settings.queue.backend}, scope {q.scope}) is shared more widely than the done set "
                f"({settings.done.backend}, scope {d.scope}): workers elsewhere would not see done names. "
                "Use the same backend for both, or set allow_local = true in [loop]"
            )
        self._shared = q.shares_done_set(d)

    def _make_backends(self) -> tuple[QueueBackend, DoneSetBackend]:
        s = self.settings
        qspec, dspec = s.queue.spec(), s.done.spec()
        assert qspec.create_queue is not None and dspec.create_done_set is not None
        return qspec.create_queue(self.name, dict(s.queue.options)), dspec.create_done_set(
            self.name, dict(s.done.options)
        )

    def _option(self, name: str) -> Any:
        return self.settings.loop[name]

    # -- handlers -----------------------------------------------------------

    def _check_handler(self, generator_name: Any) -> str:
        if not isinstance(generator_name, str):
            raise HandlerError(
                f"add_task: generator_name must be the NAME of a handler (a str), not {type(generator_name).__name__}"
            )
        if generator_name not in self._handlers and generator_name not in self.HANDLER_ALIASES:
            known = ", ".join(sorted(self._handlers)) or "none"
            raise HandlerError(
                f"{generator_name!r} is not a handler of {type(self).__name__}: a handler is a public "
                f"coroutine method defined on the subclass (handlers: {known})"
            )
        return generator_name

    def _resolve_handler(self, name: str) -> Callable[..., Awaitable[Any]] | None:
        """The bound handler for a name read from the queue, or None. Queue data is untrusted."""
        name = self.HANDLER_ALIASES.get(name, name)
        if name not in self._handlers:
            return None
        return getattr(self, name)  # type: ignore[no-any-return]

    # -- adding tasks -------------------------------------------------------

    def _new_task(
        self,
        generator_name: str,
        args: tuple[Any, ...],
        task_name: str | None,
        repeat: bool,
        priority: bool | int,
        delay: float | None,
    ) -> NewTask | None:
        """The task to push, or None when the local dedup cache knows a ``repeat=False`` name."""
        if type(generator_name) is not str or generator_name not in self._handlers:
            self._check_handler(generator_name)  # raises, unless it is an alias
        if task_name is not None and type(task_name) is not str:
            if not isinstance(task_name, str):
                raise TypeError(f"add_task: task_name must be a str or None, not {type(task_name).__name__}")
            task_name = str(task_name)
        if repeat is not True and repeat is not False:
            raise TypeError(f"add_task: repeat must be True or False, not {repeat!r}")
        if priority is not False and not isinstance(priority, int):
            raise TypeError(f"add_task: priority must be a bool or an int, not {priority!r}")
        if delay is not None:
            if not isinstance(delay, (int, float)) or isinstance(delay, bool) or not (0 <= delay < float("inf")):
                raise ValueError(f"add_task: delay must be a non-negative number of seconds, not {delay!r}")
        if not repeat and task_name is not None and task_name in self._dedup:
            # dropped before its arguments are looked at: nothing is stored, and the first
            # add of every name (never a cache hit) checks them
            self._summary.deduplicated += 1
            return None
        payload = encode_task(generator_name, task_name, args)
        key = name_key(task_name) if task_name is not None else None
        return NewTask(payload, key, not repeat and key is not None, bool(priority), float(delay or 0))

    def add_task(
        self,
        generator_name: str,
        *args: Any,
        task_name: str | None = None,
        repeat: bool = True,
        priority: bool | int = False,
        delay: float | None = None,
    ) -> None:
        """Queue a call of the handler named ``generator_name`` with ``args``.

        ``task_name`` identifies the task (``None``: never deduplicated). With
        ``repeat=False`` the task is skipped when that name is done or pending.
        ``priority`` puts it at the head of the queue; ``delay`` makes it ready
        after that many seconds. Raises ``HandlerError`` for an unknown handler
        and ``EncodeError`` (a ``TypeError``) for arguments that cannot be stored.

        Inside a handler the task is written together with the handler's ack (and
        discarded if the handler fails); elsewhere in the serving loop it is
        flushed within ``flush_interval``; with no running event loop it is
        written before this returns. In an event loop that is not serving this
        loop, it is buffered until ``await flush()`` or ``serve()``.

        ``repeat=False`` is decided by the backend when the task is written, except
        for names this process itself saw done or pending in the last
        ``dedup_cache_ttl`` seconds (the local dedup cache, ``dedup_cache`` names at
        most): those are skipped here, before their arguments are even checked (the
        first add of a name always checks them), without a round trip. The cache
        forgets a name this process uncaches, buries, or acks without ``task_done``;
        a name that another process uncaches may still be skipped here until the
        cache expires. ``dedup_cache = 0`` turns it off.
        """
        if (
            repeat is False
            and type(task_name) is str
            and task_name in self._dedup
            and priority is False
            and delay is None
            and type(generator_name) is str
            and generator_name in self._handlers
        ):  # the crawler's common case, a link seen before: what _new_task would do, in short
            self._summary.deduplicated += 1
            return
        task = self._new_task(generator_name, args, task_name, repeat, priority, delay)
        if task is not None:
            self._route([task], unique=[task_name] if task.unique else None)  # type: ignore[list-item]

    async def add_tasks(self, tasks: Iterable[Task]) -> None:
        """Add many :class:`Task` objects, written in chunks as they are produced (backpressure).

        Inside a handler they join the handler's outbox like ``add_task``.
        """
        chunk: list[NewTask] = []
        unique: list[str] = []
        in_attempt = self._current_attempt() is not None
        for t in tasks:
            task = self._new_task(t.generator_name, t.args, t.task_name, t.repeat, t.priority, t.delay)
            if task is None:
                continue
            chunk.append(task)
            if task.unique:
                unique.append(t.task_name)  # type: ignore[arg-type]
            if len(chunk) >= _BULK_CHUNK:
                self._route(chunk, unique=unique)
                chunk, unique = [], []
                if not in_attempt:
                    await self.flush()
        if chunk:
            self._route(chunk, unique=unique)
        if not in_attempt:
            await self.flush()

    def task_done(self, task_name: str) -> None:
        """Put ``task_name`` in the done set (any name, not only the running task's)."""
        if type(task_name) is not str:
            if not isinstance(task_name, str):
                raise TypeError(f"task_done: task_name must be a str, not {type(task_name).__name__}")
            task_name = str(task_name)
        self._route(done={name_key(task_name): True}, names={task_name: True})

    def uncache_task(self, *task_names: str) -> None:
        """Remove names from the done set, so ``repeat=False`` tasks of those names can be added again."""
        for n in task_names:
            if not isinstance(n, str):
                raise TypeError(f"uncache_task: task names must be str, not {type(n).__name__}")
        names = {str(n): False for n in task_names}
        for n in names:
            self._dedup.pop(n, None)  # at once: a repeat=False add right after this must reach the backend
        self._route(done={name_key(n): False for n in names}, names=names)

    def _current_attempt(self) -> _Attempt | None:
        attempt = _ATTEMPT.get()
        return attempt if attempt is not None and attempt.loop is self and not attempt.closed else None

    def _route(
        self,
        tasks: Sequence[NewTask] = (),
        done: dict[bytes, bool] | None = None,
        names: dict[str, bool] | None = None,
        unique: list[str] | None = None,
    ) -> None:
        attempt = self._current_attempt()
        running: asyncio.AbstractEventLoop | None = None
        if attempt is not None:
            outbox = attempt.outbox
        else:
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            # In an event loop: buffered. The serving loop flushes within flush_interval;
            # an event loop that is not serving must ``await flush()`` (serve() also
            # flushes what was buffered before it started). With none: written now.
            outbox = self._outbox if running is not None else _Outbox()
        if tasks:
            outbox.add(tasks)
        if done:
            outbox.done.update(done)
        if names:
            outbox.names.update(names)
        if unique:
            outbox.unique.extend(unique)
        if attempt is not None:
            return
        if running is None:
            self._write_now(outbox)
            return
        if self._serving and running is self._aloop:
            self._summary.added += len(tasks)
            if len(self._outbox.tasks) >= _BULK_CHUNK and self._flush_wanted is not None:
                self._flush_wanted.set()

    # -- the local dedup cache ----------------------------------------------------

    def _learn(self, *outboxes: _Outbox, fenced: bool = False) -> None:
        """After ``outboxes`` were written: their done names and repeat=False names are now
        done or pending (remember them), uncached names are not (forget them). After a
        commit with fenced attempts nothing is remembered: some pushes were not written."""
        cache = self._dedup
        if not self._dedup_max:
            return
        now = time.monotonic()
        if now - self._dedup_since > self._dedup_ttl:
            cache.clear()
            self._dedup_since = now
        for outbox in outboxes:
            for name, done in outbox.names.items():
                if done and not fenced:
                    cache[name] = None
                else:
                    cache.pop(name, None)
            if not fenced:
                for name in outbox.unique:
                    cache[name] = None
        if len(cache) > self._dedup_max:  # forget the oldest half
            for name in list(itertools.islice(cache, len(cache) - self._dedup_max // 2)):
                del cache[name]

    def _forget(self, name: str | None) -> None:
        """``name`` may now be neither done nor pending (acked without task_done, buried)."""
        if name is not None:
            self._dedup.pop(name, None)

    def _write_now(self, outbox: _Outbox) -> None:
        """No event loop is running: write synchronously through a private one."""
        if self._sync_runner is None:
            self._sync_runner = asyncio.Runner()

        async def write() -> None:
            if self._sync_pair is None:
                q, d = self._make_backends()
                await q.open()
                try:
                    await d.open()
                except BaseException:
                    await q.close()
                    raise
                self._sync_pair = (q, d)
            q, d = self._sync_pair
            await self._write_outbox(q, d, q.shares_done_set(d), outbox)

        self._sync_runner.run(write())
        self._learn(outbox)

    def close(self) -> None:
        """Close what synchronous ``add_task`` calls opened (a script that only adds tasks)."""
        if self._sync_runner is not None:
            pair, self._sync_pair = self._sync_pair, None

            async def close_pair() -> None:
                if pair is not None:
                    await pair[0].close()
                    await pair[1].close()

            self._sync_runner.run(close_pair())
            self._sync_runner.close()
            self._sync_runner = None

    async def _unique_filter(self, done_set: DoneSetBackend, tasks: list[NewTask]) -> list[NewTask]:
        """For a done set the queue cannot see: drop unique tasks whose name is done."""
        unique = [t for t in tasks if t.unique and t.key is not None]
        if not unique:
            return tasks
        flags = await done_set.contains([t.key for t in unique if t.key is not None])
        skip = {id(t) for t, is_done in zip(unique, flags, strict=True) if is_done}
        return [t for t in tasks if id(t) not in skip]

    async def _write_outbox(self, q: QueueBackend, d: DoneSetBackend, shared: bool, outbox: _Outbox) -> None:
        """Done-set changes first, then the pushes (a duplicate at worst, never a loss)."""
        if outbox.done:
            added, removed = outbox.split_done()
            if removed:
                await d.remove(removed)
            if added:
                await d.add(added)
        tasks = outbox.tasks
        if tasks and not shared:
            tasks = await self._unique_filter(d, tasks)
        if tasks:
            await q.push(tasks)

    async def flush(self) -> None:
        """Write everything added outside handlers now.

        While the loop is serving, a backend outage makes this wait and retry
        (the loop is paused anyway); otherwise it raises ``BackendUnavailable``
        with the writes kept for the next try.
        """
        while True:
            try:
                await self._flush_once()
                return
            except BackendUnavailable as exc:
                if not self._serving or self._stop_requested:
                    raise
                await self._backend_down(exc)

    async def _flush_once(self) -> None:
        if not self._outbox:
            return
        if not self._opened:
            await self._open()
        outbox = self._outbox.take()
        try:
            await self._write_outbox(self._queue, self._done, self._shared, outbox)
        except BaseException:
            # put it back in front so nothing is lost and order is kept
            outbox.put_back(self._outbox)
            self._outbox = outbox
            raise
        self._learn(outbox)

    async def clear_data(self, what: str = "all") -> None:
        """Delete this loop's data: ``queue`` (ready, delayed, leased), ``dead``, ``done`` or ``all``.

        The command line's ``clear``, for scripts. It does not check for running workers.
        """
        if what not in ("queue", "dead", "done", "all"):
            raise ValueError(f"clear_data: what must be queue, dead, done or all, not {what!r}")
        opened_here = not self._opened
        self._dedup.clear()
        await self._open()
        try:
            if what in ("queue", "all"):
                await self._queue.clear("queue")
            if what in ("dead", "all"):
                await self._queue.clear("dead")
            if what in ("done", "all"):
                await self._done.clear()
        finally:
            if opened_here:
                await self._close_backends()

    # -- lifecycle ----------------------------------------------------------

    def stop(self) -> None:
        """Stop this loop gracefully. Safe from handlers, signal handlers and other threads."""
        self._stop_requested = True
        loop = self._aloop
        if loop is None or loop.is_closed():
            return
        try:
            in_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            in_loop = False
        if in_loop:
            self._signal_stop()
        else:
            loop.call_soon_threadsafe(self._signal_stop)

    def _signal_stop(self) -> None:
        if self._stop_event is not None:
            self._stop_event.set()
        if self._wake is not None:
            self._wake.set()

    def _on_sigint(self) -> None:
        if self._stop_requested:
            log.warning("%s: second interrupt: skipping the grace period", self.name)
            self._force_stop = True
        self.stop()

    async def run(self) -> None:
        """Seed the first tasks (master only). Optional; runs at every master start."""

    def check_html(self, text: str) -> bool:
        """Accept or reject a fetched body; a false value makes ``async_web_request`` retry.

        The default accepts everything. Overrides may be ``async def`` too.
        """
        return True

    async def _open(self) -> None:
        if self._opened:
            return
        await self._queue.open()
        try:
            await self._done.open()
        except BaseException:
            await self._queue.close()
            raise
        self._opened = True

    async def _close_backends(self) -> None:
        if self._opened:
            self._opened = False
            try:
                await self._queue.close()
            finally:
                await self._done.close()

    def _state(self) -> str:
        if self._stop_requested:
            return "stopping"
        if self._backend_down_since is not None:
            return "paused"
        return "seeding" if self._seeding else "running"

    def _rate(self) -> float:
        """Tasks acknowledged per second over the last minute (sampled at each heartbeat)."""
        now = time.monotonic()
        samples = self._rate_samples
        samples.append((now, self._summary.succeeded))
        while len(samples) > 2 and now - samples[1][0] > 60:
            samples.popleft()
        (t0, n0), (t1, n1) = samples[0], samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def _info(self, role: str) -> dict[str, Any]:
        """What this worker publishes in the registry (shown by ``status``)."""
        s = self._summary
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "role": role,
            "state": self._state(),
            "started": self._started_wall,
            "concurrency": self.concurrency,
            "running": len(self._running),
            "succeeded": s.succeeded,
            "failed": s.failed,
            "buried": s.buried,
            "rate": round(self._rate(), 1),
            "seeding": self._seeding,
            "handlers": sorted(self._handlers),
        }

    async def serve(
        self,
        *,
        slave: bool = False,
        seed: bool = True,
        idle_exit: float | None = None,
        handle_signals: bool = False,
    ) -> RunSummary:
        """Run the loop in the current event loop until stopped (or idle).

        ``slave=True`` consumes only; a master (the default) also runs :meth:`run`
        unless ``seed=False``. ``idle_exit`` (seconds) ends the loop when the whole
        queue has been idle that long (``0``: at the first idle snapshot).
        ``handle_signals`` installs graceful SIGTERM/SIGINT handlers.
        """
        if self._serving:
            raise RuntimeError(f"{self.name} is already serving")
        if idle_exit is None:
            idle_exit = self._option("idle_exit")
        role = "slave" if slave else "master"
        self._aloop = asyncio.get_running_loop()
        self._serving = True
        self._stop_requested = self._force_stop = self._closing = False
        self._closed = asyncio.Event()
        self._wake = asyncio.Event()
        self._stop_event = asyncio.Event()
        self._flush_wanted = asyncio.Event()
        self._beat_now = asyncio.Event()
        self._summary = RunSummary()
        self._rate_samples: collections.deque[tuple[float, int]] = collections.deque()
        self._known = set()
        self._dedup.clear()  # a new incarnation starts from what the backend says
        self._dedup_since = time.monotonic()
        self._reserve_uncertain = False
        self._parked = []
        self._peers_at = float("-inf")
        self._started_wall = time.time()
        started = time.monotonic()
        self._worker = uuid.uuid4().hex
        installed: list[int] = []
        background: list[asyncio.Task[Any]] = []
        seeder: asyncio.Task[None] | None = None
        summary = self._summary
        try:
            if handle_signals and threading.current_thread() is threading.main_thread():
                self._aloop.add_signal_handler(signal.SIGTERM, self.stop)
                self._aloop.add_signal_handler(signal.SIGINT, self._on_sigint)
                installed = [signal.SIGTERM, signal.SIGINT]
            await self._open()
            self._log_start(role)
            durability = getattr(self._queue, "durability", None)
            if self._option("require_durable") and durability not in ("everysec", "always"):
                raise ConfigError(
                    f"require_durable is set but the {self.settings.queue.backend} queue at "
                    f"{self._queue.location} reports durability {durability or 'of its process only'!r}"
                )
            await self.flush()  # what was added before serve() started
            self._seeding = not slave and seed
            if isinstance(self._queue, WorkerRegistry):
                recovered = await self._queue.recover()
                if recovered:
                    log.warning("%s: recovered %d tasks of dead workers", self.name, recovered)
                self.alias = await self._queue.register(
                    self._worker, role, self._info(role), self._option("lease_timeout")
                )
                summary.alias = self.alias
                log.info("%s: registered as %s (worker %s)", self.name, self.alias, self._worker[:8])
            if self._seeding:
                seeder = asyncio.create_task(self._seed(), name=f"{self.name}-seed")
            background = [
                asyncio.create_task(self._committer(), name=f"{self.name}-committer"),
                asyncio.create_task(self._heartbeat(role), name=f"{self.name}-heartbeat"),
                asyncio.create_task(self._watchdog(), name=f"{self.name}-watchdog"),
            ]
            await self._dispatch(idle_exit, seeder)
        except (BackendError, ConfigError) as exc:
            log.error("%s: %s", self.name, exc)
            summary.exit_code = 1
            summary.reason = str(exc)
        finally:
            await self._shutdown(seeder, background)
            for sig in installed:
                self._aloop.remove_signal_handler(sig)
            summary.elapsed = time.monotonic() - started
            self._serving = False
            self._log_summary()
        return summary

    async def _seed(self) -> None:
        try:
            await self.run()
            await self.flush()  # seeding is over only when the seeds are written
        except asyncio.CancelledError:
            raise
        except Exception:
            log.error("%s: run() failed; what it added is kept:\n%s", self.name, _masked(traceback.format_exc()))
            self._summary.exit_code = 1
            self._summary.reason = "run() raised"
            self.stop()
        finally:
            self._seeding = False
            self._beat_now.set()  # tell the other workers at once: idleness depends on it

    def _log_start(self, role: str) -> None:
        s = self.settings
        durability = getattr(self._queue, "durability", None)
        log.info(
            "%s: starting as %s, concurrency %d; queue: %s at %s%s; done set: %s at %s%s",
            self.name,
            role,
            self.concurrency,
            s.queue.backend,
            self._queue.location,
            f" (durability: {durability})" if durability else "",
            s.done.backend,
            self._done.location,
            "" if self._shared else " (separate: done names are written before acks)",
        )

    async def _dispatch(self, idle_exit: float | None, seeder: asyncio.Task[None] | None) -> None:
        """Reserve → run → (committer acks) until a stop or global idleness."""
        assert self._wake is not None and self._stop_event is not None
        queue, wake = self._queue, self._wake
        idle_since: float | None = None
        poll = 0.01
        while not self._stop_requested:
            free = self.concurrency - len(self._running)
            if free <= 0:
                wake.clear()
                await wake.wait()
                continue
            try:
                if self._reserve_uncertain:
                    await self._release_unknown_leases()
                leases = await queue.reserve(self._worker, free)
            except BackendUnavailable as exc:
                self._reserve_uncertain = True  # it may have leased tasks whose reply we lost
                await self._backend_down(exc)
                continue
            self._backend_up()
            if leases:
                idle_since = None
                poll = 0.01
                deadline = self._task_deadline()
                for lease in leases:
                    self._start_attempt(lease, deadline)
                await asyncio.sleep(0)  # let handlers that finish at once free their slots
                continue
            # nothing ready
            if idle_exit is not None and not self._running and self._quiet(seeder):
                try:
                    idle = await self._globally_idle()
                except BackendUnavailable as exc:
                    await self._backend_down(exc)
                    continue
                if idle:
                    now = time.monotonic()
                    idle_since = idle_since or now
                    if now - idle_since >= idle_exit:
                        log.info("%s: the queue is idle; stopping", self.name)
                        self._summary.reason = "idle"
                        return
                else:
                    idle_since = None
            wake.clear()
            await self._wait_for_work(min(poll, 1.0))
            poll = min(poll * 2, 0.5)

    def _quiet(self, seeder: asyncio.Task[None] | None) -> bool:
        return not (self._outbox or self._commits or self._retries or self._burials or self._releases) and (
            seeder is None or seeder.done()
        )

    async def _globally_idle(self) -> bool:
        stats = await self._queue.stats()
        if stats.active:
            return False
        if isinstance(self._queue, WorkerRegistry):
            for w in await self._queue.workers():
                if w.worker != self._worker and w.info.get("seeding"):
                    return False
        return True

    async def _wait_for_work(self, timeout: float) -> None:
        """Sleep until a local event, a backend notification or ``timeout``.

        The backend's waiter outlives one poll: cancelling it every poll would, for
        Redis, drop the connection it blocks on.
        """
        assert self._wake is not None
        local = asyncio.ensure_future(self._wake.wait())
        waiters: list[asyncio.Future[Any]] = [local]
        if isinstance(self._queue, Notifier):
            if self._notify_task is None:
                self._notify_task = asyncio.ensure_future(self._queue.wait_for_tasks(_NOTIFY_WAIT))
            waiters.append(self._notify_task)
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            local.cancel()
            await asyncio.gather(local, return_exceptions=True)
        notify = self._notify_task
        if notify is not None and notify.done():
            self._notify_task = None
            if not notify.cancelled() and isinstance(notify.exception(), BackendError):
                log.debug("%s: waiting for tasks failed: %s", self.name, notify.exception())

    async def _stop_notify_waiter(self) -> None:
        notify, self._notify_task = self._notify_task, None
        if notify is not None:
            notify.cancel()
            await asyncio.gather(notify, return_exceptions=True)

    async def _backend_down(self, exc: BaseException) -> None:
        now = time.monotonic()
        if self._backend_down_since is None:
            self._backend_down_since = now
            log.warning("%s: backend unreachable, pausing: %s", self.name, exc)
        assert self._stop_event is not None
        await _wait(self._stop_event, min(5.0, 0.2 + (now - self._backend_down_since)))

    def _backend_up(self) -> None:
        if self._backend_down_since is not None:
            log.warning(
                "%s: backend reachable again after %.1f s; resuming",
                self.name,
                time.monotonic() - self._backend_down_since,
            )
            self._backend_down_since = None

    # -- attempts -----------------------------------------------------------

    async def _peer_handles(self, handler: str) -> bool:
        """Does another live worker advertise ``handler`` (its heartbeat lists its handlers)?"""
        if not isinstance(self._queue, WorkerRegistry):
            return False
        now = time.monotonic()
        if now - self._peers_at > self._option("heartbeat_interval"):
            try:
                workers = await self._queue.workers()
            except BackendError:
                return False
            lease_timeout = self._option("lease_timeout")
            self._peer_handlers = {
                h
                for w in workers
                if w.worker != self._worker and w.age <= lease_timeout
                for h in w.info.get("handlers", ())
            }
            self._peers_at = now
        return handler in self._peer_handlers

    def _task_deadline(self) -> float:
        assert self._aloop is not None
        return self._aloop.time() + float(self._option("task_timeout"))

    async def _watchdog(self) -> None:
        """Cancel handlers running past ``task_timeout`` (one timer for all, not one per task)."""
        assert self._aloop is not None
        interval = min(1.0, self._option("task_timeout") / 4)
        while not self._closing:
            await _wait(self._closed, interval)
            now = self._aloop.time()
            for task, attempt in list(self._running.items()):
                if attempt.deadline <= now and not attempt.timed_out and not attempt.closed:
                    attempt.timed_out = True
                    task.cancel("task_timeout")

    async def _release_unknown_leases(self) -> None:
        """After a reserve whose outcome is unknown: give back leases we hold but never saw."""
        if isinstance(self._queue, WorkerRegistry):
            held = await self._queue.leases(self._worker)
            stray = [lease for lease in held if lease.task_id not in self._known]
            if stray:
                n = await self._queue.release(stray)
                log.warning("%s: released %d tasks leased by a reserve whose reply was lost", self.name, n)
        self._reserve_uncertain = False

    def _start_attempt(self, lease: Lease, deadline: float) -> None:
        self._known.add(lease.task_id)
        attempt = _Attempt(self, lease, "", deadline=deadline)
        task = asyncio.create_task(self._run_attempt(attempt))
        self._running[task] = attempt
        task.add_done_callback(self._attempt_finished)

    def _attempt_finished(self, task: asyncio.Task[None]) -> None:
        self._running.pop(task, None)
        if self._wake is not None:
            self._wake.set()

    async def _run_attempt(self, attempt: _Attempt) -> None:
        lease = attempt.lease
        try:
            decoded = decode_task(lease.payload)
        except DecodeError as exc:
            log.error("%s: burying undecodable task %d: %s", self.name, lease.task_id, exc)
            self._bury(lease, f"undecodable: {exc}")
            return
        attempt.handler = decoded.handler
        attempt.name = decoded.name
        handler = self._resolve_handler(decoded.handler)
        if handler is None:
            if await self._peer_handles(decoded.handler):
                # a rolling deploy: a live worker runs a version that has this handler
                assert self._aloop is not None
                self._parked.append((self._aloop.time() + _PARK_DELAY, lease))
                return
            log.error("%s: burying task %r: unknown handler %r", self.name, _masked(decoded.name), decoded.handler)
            self._forget(decoded.name)
            self._bury(lease, f"unknown handler {decoded.handler!r}")
            return
        _ATTEMPT.set(attempt)
        try:
            try:
                await handler(*decoded.args)
            finally:
                attempt.closed = True
        except asyncio.CancelledError:
            if attempt.timed_out:  # the watchdog cancelled it: a failure like any other (retried, not lost)
                timed_out = TimeoutError(f"handler ran longer than task_timeout ({self._option('task_timeout')} s)")
                self._fail(attempt, decoded.name, timed_out, f"TimeoutError: {timed_out}")
                return
            # a stop cancelled us: the lease goes back to the queue head, the outbox is discarded
            self._releases.append(lease)
            self._kick()
            return
        except Exception as exc:
            error = "".join(traceback.format_exception_only(exc)).strip()
            self._fail(attempt, decoded.name, exc, _masked(error) or "")
            return
        self._commits.append(attempt)
        self._kick()

    def _max_retries(self, handler: str) -> int:
        handler = self.HANDLER_ALIASES.get(handler, handler)
        return int(self.HANDLER_MAX_RETRIES.get(handler, self._option("max_retries")))

    def _fail(self, attempt: _Attempt, name: str | None, exc: Exception, error: str) -> None:
        lease = attempt.lease
        self._summary.failed += 1
        if lease.failures >= self._max_retries(attempt.handler):
            log.error(
                "%s: task %r failed %d times, now a dead letter: %s",
                self.name,
                _masked(name),
                lease.failures + 1,
                error,
            )
            self._forget(name)
            self._bury(lease, error)
            return
        if isinstance(exc, Retry) and exc.delay is not None:
            delay = max(0.0, float(exc.delay))
        else:
            base = self._option("retry_delay") * (2**lease.failures)
            delay = min(self._option("retry_max_delay"), base) * random.uniform(0.5, 1.0)
        log.warning("%s: task %r failed (retry in %.1f s): %s", self.name, _masked(name), delay, error)
        if self.debug and not isinstance(exc, Retry):
            log.debug("%s", _masked("".join(traceback.format_exception(exc))))
        self._retries.append((lease, delay))
        self._summary.retried += 1
        self._kick()

    def _bury(self, lease: Lease, reason: str) -> None:
        self._burials.append((lease, reason[:2048]))
        self._summary.buried += 1
        self._kick()

    def _kick(self) -> None:
        wanted = self._flush_wanted
        if wanted is not None and not wanted.is_set():
            wanted.set()

    # -- the committer: coalesced writes ------------------------------------------

    async def _committer(self) -> None:
        """Write finished attempts, retries, burials, releases and the outbox in batches."""
        assert self._flush_wanted is not None
        interval = self._option("flush_interval")
        failures = 0
        while not self._closing:
            await _wait(self._flush_wanted, interval)
            if self._closing:
                return
            self._flush_wanted.clear()
            await asyncio.sleep(0)  # coalesce handlers finishing in the same tick
            try:
                await self._write_batch()
                failures = 0
            except BackendUnavailable as exc:
                failures += 1
                await self._backend_down(exc)
                self._flush_wanted.set()
            except BackendError as exc:
                failures += 1
                log.error("%s: write failed (%d): %s", self.name, failures, exc)
                await asyncio.sleep(min(5.0, 0.1 * 2**failures))
                self._flush_wanted.set()

    def _unpark(self, everything: bool = False) -> None:
        """Parked leases (tasks for a handler only a peer has) go back to the queue when due."""
        if self._parked:
            assert self._aloop is not None
            now = self._aloop.time()
            due = [lease for at, lease in self._parked if everything or at <= now]
            if due:
                self._parked = [(at, lease) for at, lease in self._parked if not (everything or at <= now)]
                self._releases.extend(due)

    async def _write_batch(self) -> None:
        """One round of writes. What fails is put back, so a later round retries it."""
        self._unpark(everything=self._closing)
        q = self._queue
        if self._commits:
            attempts, self._commits = self._commits, []
            try:
                applied = await self._commit(attempts)
            except BaseException:
                self._commits[:0] = attempts
                raise
            self._known.difference_update(a.lease.task_id for a in attempts)
            self._learn(*(a.outbox for a in attempts), fenced=applied < len(attempts))
            for a in attempts:
                if a.name is not None and not a.outbox.names.get(a.name) and a.name not in a.outbox.unique:
                    self._forget(a.name)  # acked without task_done: no longer pending, maybe not done
            self._summary.succeeded += applied
            self._summary.added += sum(len(a.outbox.tasks) for a in attempts)
            self._summary.fenced += len(attempts) - applied
            if applied < len(attempts):
                log.warning("%s: %d commits were fenced (their lease was lost)", self.name, len(attempts) - applied)
        for attr, method in (("_retries", q.retry), ("_burials", q.bury), ("_releases", q.release)):
            items = getattr(self, attr)
            if items:
                setattr(self, attr, [])
                try:
                    n = await method(items)
                except BaseException:
                    getattr(self, attr)[:0] = items
                    raise
                self._known.difference_update((item if attr == "_releases" else item[0]).task_id for item in items)
                if attr == "_releases":
                    self._summary.released += n
        if self._outbox:
            await self.flush()

    async def _commit(self, attempts: list[_Attempt]) -> int:
        q, d = self._queue, self._done
        if self._shared:
            commits = [Commit(a.lease, *a.outbox.split_done(), a.outbox.tasks) for a in attempts]
        else:
            merged = _Outbox()
            for a in attempts:
                merged.done.update(a.outbox.done)
            await self._write_outbox(q, d, False, merged)  # done names first: a duplicate, never a loss
            commits = []
            for a in attempts:
                children = await self._unique_filter(d, a.outbox.tasks) if a.outbox.tasks else []
                commits.append(Commit(a.lease, children=children))
        return await q.commit(commits)

    # -- heartbeat -----------------------------------------------------------

    async def _heartbeat(self, role: str) -> None:
        queue = self._queue
        interval = self._option("heartbeat_interval")
        lease_timeout = self._option("lease_timeout")
        progress = self._option("progress_interval")
        next_progress = time.monotonic() + progress if progress else None
        last_ok = time.monotonic()
        while not self._closing:
            before = time.monotonic()
            if not await _wait(self._beat_now, interval):
                lag = time.monotonic() - before - interval
                if lag > 1.0:
                    log.warning("%s: event loop lagged %.1f s (a handler is blocking it?)", self.name, lag)
            if self._closing:
                return
            self._beat_now.clear()
            if not isinstance(queue, WorkerRegistry):
                continue
            try:
                commands = await queue.heartbeat(self._worker, self._info(role), lease_timeout)
                if commands is None or time.monotonic() - last_ok > lease_timeout:
                    old = self._worker
                    self._worker = uuid.uuid4().hex
                    self.alias = await queue.register(self._worker, role, self._info(role), lease_timeout)
                    log.warning(
                        "%s: worker %s was declared dead; re-registered as %s (%s)",
                        self.name,
                        old[:8],
                        self.alias,
                        self._worker[:8],
                    )
                    commands = []
                last_ok = time.monotonic()
                for command in commands:
                    if command == "stop":
                        log.info("%s: stop command received", self.name)
                        self.stop()
                recovered = await queue.recover()
                if recovered:
                    log.warning("%s: recovered %d tasks of dead workers", self.name, recovered)
            except BackendError as exc:
                log.warning("%s: heartbeat failed: %s", self.name, exc)
            if next_progress is not None and time.monotonic() >= next_progress:
                next_progress = time.monotonic() + progress
                await self._log_progress()

    async def _log_progress(self) -> None:
        """One line, as crawler users expect: rate, queue depth, done, failures, running."""
        s = self._summary
        try:
            stats: QueueStats | None = await self._queue.stats()
            done: int | None = await self._done.count()
        except BackendError:
            stats, done = None, None
        queue = (
            f"queue {stats.ready} ready, {stats.delayed} delayed, {stats.leased} leased, {stats.dead} dead; "
            f"{done} done names"
            if stats is not None
            else "queue unreachable"
        )
        log.info(
            "%s: %.1f tasks/s; %d ok, %d failed, %d dead letters, %d running; %s",
            self.name,
            self._rate(),
            s.succeeded,
            s.failed,
            s.buried,
            len(self._running),
            queue,
        )

    # -- shutdown -------------------------------------------------------------

    async def _shutdown(self, seeder: asyncio.Task[None] | None, background: list[asyncio.Task[Any]]) -> None:
        self._stop_requested = True
        if seeder is not None and not seeder.done():
            seeder.cancel()
            await asyncio.gather(seeder, return_exceptions=True)
        if self._running:
            grace = 0.0 if self._force_stop else self._option("grace_period")
            log.info("%s: stopping; %d handlers running get %.1f s to finish", self.name, len(self._running), grace)
            await self._wait_running(grace)
        if self._running:
            log.warning(
                "%s: cancelling %d handlers; their tasks go back to the queue head", self.name, len(self._running)
            )
            for task in list(self._running):
                task.cancel()
            await asyncio.wait(list(self._running), timeout=_RELEASE_WAIT)
        await self._stop_notify_waiter()
        # the committer and the heartbeat finish the call they are in (a write cut off
        # mid-flight would be repeated and show up as fenced), then end
        self._closing = True
        self._closed.set()
        assert self._flush_wanted is not None
        self._flush_wanted.set()
        self._beat_now.set()
        if background:
            _, late = await asyncio.wait(background, timeout=_BACKGROUND_WAIT)
            for task in late:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
        try:
            if self._opened:
                await self._final_writes()
                if isinstance(self._queue, WorkerRegistry) and self.alias is not None:
                    await self._queue.unregister(self._worker)
        except BackendError as exc:
            log.error(
                "%s: could not write before exiting (leases come back after the lease timeout): %s", self.name, exc
            )
            self._summary.exit_code = 1
            self._summary.reason = self._summary.reason or str(exc)
        finally:
            self._drop_stray_leases()
            await self._close_backends()
            await self._close_http()

    async def _wait_running(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        while self._running and not self._force_stop:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            assert self._wake is not None
            self._wake.clear()
            if not await _wait(self._wake, remaining):
                return

    async def _final_writes(self) -> None:
        deadline = time.monotonic() + 10
        while True:
            try:
                await self._write_batch()
                return
            except BackendUnavailable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)

    def _drop_stray_leases(self) -> None:
        for task in self._running:
            log.error("%s: handler %s did not stop; its lease comes back after the lease timeout", self.name, task)
        self._running.clear()

    def _log_summary(self) -> None:
        s = self._summary
        log.info(
            "%s: finished in %.1f s (%s): %d ok (%.1f/s), %d failed (%d retried, %d dead), %d released, "
            "%d fenced, %d added, %d duplicates skipped locally",
            self.name,
            s.elapsed,
            s.reason or "stopped",
            s.succeeded,
            s.succeeded / s.elapsed if s.elapsed else 0.0,
            s.failed,
            s.retried,
            s.buried,
            s.released,
            s.fenced,
            s.added,
            s.deduplicated,
        )

    # -- synchronous entry points -------------------------------------------------

    def run_until_idle(self, *, slave: bool = False, seed: bool = True, idle_exit: float = 0.0) -> RunSummary:
        """Run in a fresh event loop until the queue is idle (tests, scripts, benchmarks)."""
        return asyncio.run(self.serve(slave=slave, seed=seed, idle_exit=idle_exit, handle_signals=True))

    def start(self, argv: Sequence[str] | None = None) -> None:
        """The command line: ``start [-s]``, ``stop m1 …``, ``status``, ``clear`` (reads ``sys.argv``).

        Exits the process with 0 (ok), 1 (failure) or 2 (usage error).
        """
        from .cli import run_spider_cli

        raise SystemExit(run_spider_cli(self, argv))

    # -- HTTP -----------------------------------------------------------------------

    async def async_web_request(self, item: Item | dict[str, Any], *, session: Any = None, **legacy: Any) -> Any:
        """One HTTP request described by ``item`` through the loop's shared aiohttp session.

        Retries connection errors, timeouts and 5xx/429 responses with backoff up to
        ``item.max_retry`` tries in total; a ``check_html(text)`` method on the loop
        may reject a body (then it retries). Returns a
        :class:`~achihuo_mini.http.Response`; raises
        :class:`~achihuo_mini.errors.RequestError` after the last try. ``session``,
        ``keep_alive`` and ``check_html`` keywords of seed-era code are accepted.
        """
        if self._http is None:
            from .http import HttpClient

            self._http = HttpClient(self)
        return await self._http.request(item, session=session, **legacy)

    async def _close_http(self) -> None:
        if self._http is not None:
            http, self._http = self._http, None
            await http.close()
