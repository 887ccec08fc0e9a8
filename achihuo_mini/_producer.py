"""Producing tasks: checking and encoding adds, routing them to an outbox, the local dedup cache.

:class:`Producer` is what ``add_task``, ``add_tasks``, ``task_done``, ``uncache_task`` and
``flush`` delegate to. :class:`HandlerTable` says which names are handlers (for adds and
for tasks read back from the queue). :class:`DoneCache` is the one speed shortcut of the
producer, built so that it cannot disagree with the backend: it holds only names that
this process itself wrote to the done set (a successful ``task_done`` commit), each
until ``dedup_cache_ttl`` has passed, checked at every lookup. Pending names are never
cached: whether a name is pending changes with every ack anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ._outbox import CURRENT, Outbox
from ._stats import Stats
from ._store import Backoff, Store
from .backend import NewTask, name_key
from .codec import encode_task
from .errors import AchihuoError, BackendError, ConfigError, EncodeError, HandlerError, TaskTooLarge
from .urls import canonical_url, is_http_url

__all__ = ["BlockingWriter", "DoneCache", "HandlerTable", "Producer", "Serving", "Task"]

BULK_CHUNK = 1000

log = logging.getLogger("achihuo_mini")


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


class HandlerTable:
    """The handlers of one spider: public coroutine methods its class defines beyond the framework's.

    ``framework`` are the names the base class defines (``run``, ``stop``, ``add_task`` …):
    never handlers, and never run for a task read from the queue, whatever a peer says.
    """

    def __init__(self, spider: object, framework: frozenset[str]) -> None:
        cls = type(spider)
        self.spider = spider
        self.framework = framework
        self.owner = cls.__name__
        self.names = frozenset(
            name
            for name in dir(cls)
            if not name.startswith("_")
            and name not in framework
            and inspect.iscoroutinefunction(getattr(cls, name, None))
        )
        self.aliases: dict[str, str] = dict(getattr(cls, "HANDLER_ALIASES", {}) or {})
        self.max_retries: dict[str, int] = dict(getattr(cls, "HANDLER_MAX_RETRIES", {}) or {})
        self.arity: dict[str, tuple[int, int | None, str]] = {}
        for name in self.names:
            arity = _arity(getattr(cls, name))
            if arity is not None:
                self.arity[name] = arity

    def check(self, name: Any) -> str:
        """``name`` if an add may name it; else :class:`HandlerError` naming it."""
        if type(name) is str and (name in self.names or name in self.aliases):
            return name
        if not isinstance(name, str):
            raise HandlerError(
                f"add_task: generator_name must be the NAME of a handler (a str), not {type(name).__name__}"
            )
        known = ", ".join(sorted(self.names)) or "none"
        plain = getattr(type(self.spider), name, None)
        if callable(plain) and not name.startswith("_") and name not in self.framework:
            raise HandlerError(
                f"{name!r} is a plain method of {self.owner}, not a handler: handlers are coroutine "
                f"methods, write `async def {name}(self, ...)` (handlers: {known})"
            )
        raise HandlerError(
            f"{name!r} is not a handler of {self.owner}: a handler is a public "
            f"coroutine method defined on the subclass (handlers: {known})"
        )

    def check_args(self, name: str, n: int) -> None:
        """:class:`HandlerError` unless handler ``name`` can be called with ``n`` positional arguments."""
        arity = self.arity.get(self.aliases.get(name, name))
        if arity is None:
            return
        least, most, shown = arity
        if least <= n and (most is None or n <= most):
            return
        if least < 0:
            raise HandlerError(f"handler {name}{shown} has a keyword-only parameter without a default: add_task "
                               "passes positional arguments only; give it a default or make it positional")  # fmt: skip
        wanted = f"{least}" if most == least else f"at least {least}" if most is None else f"{least} to {most}"
        raise HandlerError(
            f"add_task: handler {name}{shown} takes {wanted} argument{'' if wanted == '1' else 's'} "
            f"after self, got {n}"
        )

    def resolve(self, name: str) -> Callable[..., Awaitable[Any]] | None:
        """The bound handler for a name read from the queue (untrusted), or None."""
        name = self.aliases.get(name, name)
        if name not in self.names:
            return None
        return getattr(self.spider, name)  # type: ignore[no-any-return]

    def impossible(self, name: str) -> bool:
        """Names no loop can have as a handler: private ones and the framework's own."""
        return not name or name.startswith("_") or name in self.framework

    def retries(self, name: str, default: int) -> int:
        """The retry limit of handler ``name`` (``HANDLER_MAX_RETRIES``, else the loop's)."""
        name = self.aliases.get(name, name)
        value = self.max_retries.get(name, default)
        return value if type(value) is int and value >= 0 else default


def _arity(function: Any) -> tuple[int, int | None, str] | None:
    """(fewest, most or None, the signature shown) positional arguments a handler takes after
    ``self``; fewest is -1 when a keyword-only parameter has no default (add_task cannot pass
    it). None when the signature cannot be read."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return None
    params = list(signature.parameters.values())[1:]  # self
    least, most = 0, 0
    unlimited = False
    for p in params:
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            most += 1
            if p.default is p.empty:
                least = most
        elif p.kind is p.VAR_POSITIONAL:
            unlimited = True
        elif p.kind is p.KEYWORD_ONLY and p.default is p.empty:
            least = -1
    shown = "(" + ", ".join(str(p) for p in params) + ")"
    if least < 0:
        return -1, -1, shown
    return least, None if unlimited else most, shown


class DoneCache:
    """Names this process wrote to the done set, each until a deadline checked at lookup.

    A ``repeat=False`` add of such a name is dropped at once: the backend would drop it
    too (it is done). The one window left is documented: another process may remove the
    name (``uncache_task``, ``clear done``) and this one still drops it until the entry
    expires. A removal this process made is honoured at once, also while it is unwritten.
    """

    __slots__ = ("_removing", "names", "size", "ttl")

    def __init__(self, size: int, ttl: float) -> None:
        self.size = size
        self.ttl = ttl
        self.names: dict[str, float] = {}  # name -> monotonic deadline, oldest first
        self._removing: dict[str, int] = {}  # names whose removal this process has not written yet

    def hit(self, name: str) -> bool:
        deadline = self.names.get(name)
        if deadline is None:
            return False
        if deadline < time.monotonic():
            del self.names[name]
            return False
        return name not in self._removing

    def removing(self, names: Iterable[str]) -> None:
        """``uncache_task`` was called: forget the names now, and until the removal is written."""
        for name in names:
            self.names.pop(name, None)
            self._removing[name] = self._removing.get(name, 0) + 1

    def written(self, outboxes: Iterable[Outbox], learn: bool = True) -> None:
        """``outboxes`` were written (``learn``), or dropped, or written only in part (not ``learn``)."""
        names, removing = self.names, self._removing
        now = time.monotonic()
        deadline = now + self.ttl
        for outbox in outboxes:
            for name in outbox.removed:
                left = removing.get(name, 0) - 1
                if left > 0:
                    removing[name] = left
                else:
                    removing.pop(name, None)
            if learn and self.size and outbox.marks:
                ttls = outbox.ttls
                for key, (done, name, _) in outbox.marks.items():
                    names.pop(name, None)
                    if done:
                        if key in ttls:  # done for a while only: never cached past the backend's deadline
                            names[name] = min(deadline, outbox.marked_at + ttls[key])
                        else:
                            names[name] = deadline
        if len(names) > self.size:  # forget the oldest half
            for name in list(itertools.islice(names, len(names) - self.size // 2)):
                del names[name]

    def clear(self) -> None:
        self.names.clear()


def canonical_name(name: str) -> str:
    """``canonical_names``: an http(s) URL name in its canonical spelling; any other name as it is."""
    if is_http_url(name):
        try:
            return canonical_url(name)
        except ValueError:
            return name  # not a URL w3lib can read: the name stays as written
    return name


class Serving(Protocol):
    """What the producer needs from a loop that is serving in the running event loop."""

    aloop: asyncio.AbstractEventLoop
    backoff: Backoff
    stopping: bool

    def kick(self) -> None: ...

    def written(self, offered: int, pushed: int) -> None:
        """``offered`` tasks added outside handlers were written; ``pushed`` of them enqueued."""


class Producer:
    """Checks, encodes and routes what a spider writes (see the module docstring)."""

    def __init__(
        self,
        handlers: HandlerTable,
        store: Store,
        make_store: Callable[[], Store],
        options: Mapping[str, Any],
        stats: Stats,
    ) -> None:
        self.handlers = handlers
        self.outbox = Outbox()  # writes made in an event loop outside handlers
        self.serving: Serving | None = None
        self.stats = stats
        self.writing = 0
        self._make_store = make_store
        self.blocking = BlockingWriter(make_store)
        self.reconfigure(store, options)

    def reconfigure(self, store: Store, options: Mapping[str, Any]) -> None:
        """New settings (the command line's): a new store; buffered writes are kept."""
        self.store = store
        self.cache = DoneCache(int(options["dedup_cache"]), float(options["dedup_cache_ttl"]))
        self.max_task_size = int(options["max_task_size"])
        self.canonical = bool(options.get("canonical_names"))
        self.done_ttl: float | None = options.get("done_ttl")
        self.blocking.close()
        self.blocking = BlockingWriter(self._make_store)

    # -- building tasks --------------------------------------------------------------

    def new_task(
        self,
        generator_name: str,
        args: tuple[Any, ...] | list[Any],
        task_name: str | None,
        repeat: bool,
        priority: bool | int,
        delay: float | None,
    ) -> NewTask | None:
        """The task to push, or None when the dedup cache drops a ``repeat=False`` name."""
        handlers = self.handlers
        if type(generator_name) is not str or generator_name not in handlers.names:
            handlers.check(generator_name)  # raises, unless it is an alias
        handlers.check_args(generator_name, len(args))
        if task_name is not None and type(task_name) is not str:
            if not isinstance(task_name, str):
                raise TypeError(f"add_task: task_name must be a str or None, not {type(task_name).__name__}")
            task_name = str(task_name)
        if self.canonical and task_name is not None:
            task_name = canonical_name(task_name)
        if repeat is not True and repeat is not False:
            raise TypeError(f"add_task: repeat must be True or False, not {repeat!r}")
        if priority is not False and not isinstance(priority, int):
            raise TypeError(f"add_task: priority must be a bool or an int, not {priority!r}")
        if delay is not None:
            if not isinstance(delay, (int, float)) or isinstance(delay, bool) or not (0 <= delay < 1e9):
                raise ValueError(f"add_task: delay must be a number of seconds from 0 to 1e9, not {delay!r}")
        if not repeat and task_name is not None and self.cache.hit(task_name):
            # dropped before its arguments are looked at: nothing is stored, and the first
            # add of every name (never a cache hit) checks them
            self.stats.add("tasks/deduplicated")
            return None
        payload = encode_task(generator_name, task_name, args)
        if len(payload) > self.max_task_size:
            raise TaskTooLarge(
                f"add_task: task {generator_name!r} is {len(payload)} bytes encoded, over max_task_size "
                f"({self.max_task_size} bytes); pass a reference (a URL, a file name) instead of the data"
            )
        key = name_key(task_name) if task_name is not None else None
        return NewTask(payload, key, not repeat and key is not None, bool(priority), float(delay or 0))

    def add(
        self,
        generator_name: str,
        args: tuple[Any, ...],
        task_name: str | None,
        repeat: bool,
        priority: bool | int,
        delay: float | None,
    ) -> None:
        if self.canonical and type(task_name) is str:
            task_name = canonical_name(task_name)
        if (
            repeat is False
            and type(task_name) is str
            and task_name in self.cache.names
            and priority is False
            and delay is None
            and type(generator_name) is str
            and generator_name in self.handlers.names
            and self.cache.hit(task_name)
        ):  # the crawler's common case, a link this process marked done: what new_task does, in short
            counts = self.stats.counts
            counts["tasks/deduplicated"] = counts.get("tasks/deduplicated", 0) + 1
            return
        task = self.new_task(generator_name, args, task_name, repeat, priority, delay)
        if task is not None:
            self.route([task])

    async def add_many(self, tasks: Iterable[Task]) -> None:
        """Like ``add_task`` per task, in chunks. If the iterable (or a task) raises midway, the
        tasks before it are kept, as separate ``add_task`` calls would have kept them."""
        chunk: list[NewTask] = []
        if self._attempt_outbox() is not None:  # they join the handler's outbox
            try:
                for t in tasks:
                    task = self.new_task(t.generator_name, t.args, t.task_name, t.repeat, t.priority, t.delay)
                    if task is not None:
                        chunk.append(task)
            finally:
                self.route(chunk)
            return
        async with self._opened():  # not serving: one connection for every chunk
            try:
                for t in tasks:
                    task = self.new_task(t.generator_name, t.args, t.task_name, t.repeat, t.priority, t.delay)
                    if task is None:
                        continue
                    chunk.append(task)
                    if len(chunk) >= BULK_CHUNK:
                        self.route(chunk)
                        chunk = []
                        await self.flush()
            finally:
                if chunk:
                    self.route(chunk)
            await self.flush()

    @contextlib.asynccontextmanager
    async def _opened(self) -> AsyncIterator[None]:
        """The store open for the block; closed after it if it was opened here (not serving)."""
        store = self.store
        if store.opened:
            yield
            return
        await store.open()
        try:
            yield
        finally:
            await store.close()

    def mark(self, names: Sequence[Any], done: bool, caller: str, ttl: float | None = None) -> None:
        """``task_done`` (``done``, for ``ttl`` seconds or the loop's ``done_ttl``) or ``uncache_task`` of ``names``."""
        if done and (ttl is not None or self.done_ttl is not None):
            ttl = self._ttl(ttl, caller)
        marks: list[tuple[bytes, str]] = []
        for name in names:
            if type(name) is not str:
                if not isinstance(name, str):
                    raise TypeError(f"{caller}: task names must be str, not {type(name).__name__}")
                name = str(name)
            try:
                name.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise EncodeError(f"{caller}: task name {name!r} cannot be stored: {exc.reason}") from None
            if self.canonical:
                name = canonical_name(name)
            marks.append((name_key(name), name))
        if not done:
            self.cache.removing(n for _, n in marks)
        self.route(marks=marks, done=done, ttl=ttl)

    def _ttl(self, ttl: Any, caller: str) -> float | None:
        """The ttl of a ``task_done``: checked, else the loop's ``done_ttl`` (None: for ever)."""
        if ttl is None:
            ttl = self.done_ttl
            if ttl is None:
                return None
        elif isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl <= 1e9:
            raise ValueError(f"{caller}: ttl must be a number of seconds, more than 0 and at most 1e9, not {ttl!r}")
        if self.store.expiring is None:
            raise ConfigError(
                f"{caller}: the {self.store.settings.done.backend!r} done set cannot expire names "
                "(it does not implement ExpiringDoneSet): call it without ttl, or use a done set that can"
            )
        return float(ttl)

    # -- routing ---------------------------------------------------------------------

    def _attempt_outbox(self) -> Outbox | None:
        attempt = CURRENT.get()
        if attempt is not None and attempt.owner is self and not attempt.closed:
            return attempt.outbox
        return None

    def route(
        self,
        tasks: Sequence[NewTask] = (),
        marks: Sequence[tuple[bytes, str]] = (),
        done: bool = True,
        ttl: float | None = None,
    ) -> None:
        """Put writes in the current attempt's outbox, the loop's outbox, or write them now."""
        outbox = self._attempt_outbox()
        if outbox is not None:
            if tasks:
                dropped = outbox.add(tasks)
                if dropped:
                    self.stats.add("tasks/deduplicated", dropped)
            for key, name in marks:
                outbox.mark(key, name, done, ttl)
            return
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is None:
            # no event loop: written before this returns (a feeder script)
            once = Outbox()
            once.add(tasks)
            for key, name in marks:
                once.mark(key, name, done, ttl)
            try:
                self.blocking.write(once)
            except BaseException:
                self.cache.written([once], learn=False)
                raise
            self.cache.written([once])
            return
        # in an event loop: buffered; one that is not serving must ``await flush()``
        outbox = self.outbox
        dropped = outbox.add(tasks) if tasks else 0
        if dropped:
            self.stats.add("tasks/deduplicated", dropped)
        for key, name in marks:
            outbox.mark(key, name, done, ttl)
        serving = self.serving
        if serving is not None and running is serving.aloop and len(outbox) >= BULK_CHUNK:
            serving.kick()

    # -- flushing --------------------------------------------------------------------

    async def flush(self) -> None:
        """Write the loop's outbox; while serving, an outage waits (the loop is paused anyway)."""
        while True:
            try:
                await self.flush_once()
                return
            except BackendError as exc:
                serving = self.serving
                if serving is None or serving.stopping:
                    raise
                await serving.backoff.failed(exc, "flush")

    async def flush_once(self) -> None:
        if not self.outbox:
            return
        async with self._opened():  # not serving: open for this write only (no connection left behind)
            outbox = self.outbox.take()
            self.writing += 1  # in flight: not idle (another worker may be waiting for these tasks)
            try:
                pushed = await self.store.write(outbox)
            except BaseException:
                # put it back in front so nothing is lost and order is kept
                outbox.put_back(self.outbox)
                self.outbox = outbox
                raise
            finally:
                self.writing -= 1
        self.cache.written([outbox])
        serving = self.serving
        if serving is not None:
            serving.written(len(outbox.tasks), pushed)

    def take_unwritten(self) -> Outbox:
        """Everything still buffered (to spill it at exit); the cache stops waiting for its removals."""
        outbox = self.outbox.take()
        self.cache.written([outbox], learn=False)
        return outbox


class BlockingWriter:
    """Writes outboxes when no event loop is running (a separate script adding tasks).

    It opens its own backend objects in a private event loop on first use; :meth:`close`
    closes them.
    """

    def __init__(self, make_store: Callable[[], Store]) -> None:
        self._make_store = make_store
        self._runner: asyncio.Runner | None = None
        self._store: Store | None = None
        self._lock = threading.Lock()  # threads of a script take turns: one private event loop

    def write(self, outbox: Outbox) -> None:
        with self._lock:
            self._run(self._write(outbox))

    async def _write(self, outbox: Outbox) -> None:
        if self._store is None:
            store = self._make_store()
            await store.open()
            self._store = store
        await self._store.write(outbox)

    def _run(self, coro: Awaitable[None]) -> None:
        if self._runner is None:
            self._runner = asyncio.Runner()
        self._runner.run(coro)  # type: ignore[arg-type]

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._runner is None:
            return
        store, self._store = self._store, None
        try:
            if store is not None:
                self._run(store.close())
        except AchihuoError as exc:
            log.warning("closing the backends failed: %s", exc)
        finally:
            self._runner.close()
            self._runner = None
