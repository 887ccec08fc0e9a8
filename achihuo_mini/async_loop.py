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

This class is only what spiders call or override; it delegates the rest (one object
each, see the README's "Architecture"): producing tasks to :mod:`._producer`, storage
to :mod:`._store`, serving to :mod:`._worker` (reserve → run → commit → heartbeat →
shutdown), the registry to :mod:`._presence`, log lines and ``status`` data to
:mod:`._report`. A task leaves the queue only when its handler returns; what a handler
adds is written together with its ack, so a crash never loses a task and a retry never
duplicates children.

The instance keeps its state in one name-mangled attribute, so a spider's own
attributes (``self._queue``, ``self._session`` …) never collide with the framework's.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import os
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from ._producer import HandlerTable, Producer, Task
from ._report import RunSummary
from ._stats import NoStats, Stats
from ._store import Store
from ._worker import Worker
from .config import DEFAULT_CACHE_BACKEND, LOOP_OPTIONS, Settings, load_settings
from .errors import ConfigError
from .item import Item
from .plugins import coerce_option

if TYPE_CHECKING:  # aiohttp is imported on the first request (about 10 MiB a process may not need)
    from .http import HttpClient, Response

__all__ = ["DEFAULT_CACHE_BACKEND", "AsyncLoop", "RunSummary", "Task"]


class _Core:
    """Everything an ``AsyncLoop`` instance holds besides its public attributes."""

    __slots__ = ("handlers", "http", "init", "last_alias", "producer", "stats", "store", "worker")

    def __init__(self, handlers: HandlerTable, init: dict[str, Any]) -> None:
        self.handlers = handlers
        self.stats = Stats()
        self.init = init
        self.store: Store | None = None
        self.producer: Producer | None = None
        self.worker: Worker | None = None
        self.http: HttpClient | None = None
        self.last_alias: str | None = None


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
        Loop options (see the README and :data:`achihuo_mini.config.LOOP_OPTIONS`):
        ``grace_period`` (8 s), ``lease_timeout`` (30 s), ``heartbeat_interval`` (10 s),
        ``task_timeout`` (600 s), ``max_retries`` (3), ``retry_delay`` (1 s),
        ``retry_max_delay`` (300 s), ``idle_exit`` (None), ``flush_interval`` (0.1 s),
        ``progress_interval`` (60 s), ``allow_local``, ``require_durable``,
        ``max_task_size`` (1 MiB), ``log_level``, ``user_agent``, ``request_timeout``,
        ``max_body_size``, ``per_host_limit``, ``per_host_delay``, ``per_host_scope``
        (``'loop'``), ``obey_robots`` (False), ``canonical_names`` (False), ``done_ttl``
        (None), ``dedup_cache``, ``dedup_cache_ttl``.

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

    settings: Settings
    concurrency: int
    debug: bool

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
        run = getattr(type(self), "run", None)
        if not inspect.iscoroutinefunction(run):
            raise ConfigError(
                f"{type(self).__name__}.run must be a coroutine function: write `async def run(self):` "
                f"(it is {'a plain function' if inspect.isfunction(run) else type(run).__name__})"
            )
        handlers = HandlerTable(self, _FRAMEWORK)
        for old, new in handlers.aliases.items():
            if new not in handlers.names:
                raise ConfigError(
                    f"HANDLER_ALIASES maps {old!r} to {new!r}, which is not a handler of {type(self).__name__}"
                )
        init = {
            "kwargs": dict(options, concurrency=concurrency, debug=debug),
            "cache_backend": cache_backend,
            "queue_backend": queue_backend,
            "config_file": config_file,
        }
        self.__core = _Core(handlers, init)
        self.configure()

    def configure(self, **cli_options: Any) -> None:
        """Resolve the settings again, with ``cli_options`` over everything else.

        The command line's options: ``backend`` (both sides), ``config`` (the file), and
        any loop option (``concurrency``, ``log_level``, ``idle_exit`` …). Raises
        ``ConfigError`` (nothing changes then). Not while serving.
        """
        core = self.__core
        if core.worker is not None:
            raise RuntimeError(f"{self.name}: configure() while serving")
        init = core.init
        settings = load_settings(
            kwargs=init["kwargs"],
            cache_backend=init["cache_backend"],
            queue_backend=init["queue_backend"],
            config_file=init["config_file"],
            cli={k: v for k, v in cli_options.items() if v is not None},
        )
        store = Store(self.name, settings)
        self.settings = settings
        self.concurrency = settings.loop["concurrency"]
        self.debug = settings.loop["debug"]
        if core.producer is None:
            core.producer = Producer(core.handlers, store, self._new_store, settings.loop, core.stats)
        else:
            core.producer.reconfigure(store, settings.loop)
        core.store = store
        if core.http is not None and not core.http.session_open:
            core.http = None  # built again from the new settings on the next request

    def __getattr__(self, name: str) -> Any:
        # only called for attributes that do not exist: a spider whose __init__ never ran ours
        if name in _SET_BY_INIT and "_AsyncLoop__core" not in self.__dict__:
            raise ConfigError(
                f"{type(self).__name__}.__init__ did not call super().__init__(): add "
                "`super().__init__(concurrency=..., cache_backend=...)` to it"
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}", name=name, obj=self)

    def _new_store(self) -> Store:
        return Store(self.name, self.settings)

    @property
    def stats(self) -> Stats:
        """This loop's counters in this process: ``self.stats.inc('items')`` counts the spider's own.

        Published with each heartbeat, they add up over every worker of the loop in
        ``status``, ``status --json``, the metrics and the final stats table. (A spider
        that assigns ``self.stats`` itself keeps its own attribute.)"""
        own = self.__dict__.get("_AsyncLoop__own_stats")
        return own if own is not None else self.__core.stats

    @stats.setter
    def stats(self, value: Any) -> None:
        self.__dict__["_AsyncLoop__own_stats"] = value

    @property
    def alias(self) -> str | None:
        """This worker's alias (``m1``, ``s2`` …) while it serves on a queue with a registry."""
        core = self.__core
        if core.worker is not None:
            return core.worker.presence.alias
        return core.last_alias

    # -- adding tasks -------------------------------------------------------------------

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
        after that many seconds. Raises ``HandlerError`` for an unknown handler,
        ``EncodeError`` (a ``TypeError``) for arguments or a name that cannot be
        stored, and ``TaskTooLarge`` for a task over ``max_task_size``.

        Inside a handler the task is written together with the handler's ack (and
        discarded if the handler fails); elsewhere in the serving loop it is
        flushed within ``flush_interval``; with no running event loop it is
        written before this returns. In an event loop that is not serving this
        loop, it is buffered until ``await flush()`` or ``serve()``.

        ``repeat=False`` is decided by the backend when the task is written, except
        for names this process itself marked done (``task_done``) in the last
        ``dedup_cache_ttl`` seconds: those are dropped here at once, as the backend
        would drop them. A name that *another* process uncaches may still be dropped
        here until its entry expires; ``dedup_cache = 0`` turns the cache off.
        """
        self.__core.producer.add(generator_name, args, task_name, repeat, priority, delay)  # type: ignore[union-attr]

    async def add_tasks(self, tasks: Iterable[Task]) -> None:
        """Add many :class:`Task` objects, written in chunks as they are produced (backpressure).

        Inside a handler they join the handler's outbox like ``add_task``.
        """
        await self.__core.producer.add_many(tasks)  # type: ignore[union-attr]

    def task_done(self, task_name: str, ttl: float | None = None) -> None:
        """Put ``task_name`` in the done set (any name, not only the running task's).

        With ``ttl`` (seconds; default: the ``done_ttl`` option, None = for ever) the name
        blocks ``repeat=False`` adds only until it is older than that, in the backend's
        clock: a later run of the master that seeds it again crawls it again (re-crawls).
        A later ``task_done`` of the name replaces its ttl (without one: done for ever,
        unless ``done_ttl`` is set). Raises ``ValueError`` for a ttl that is not a number
        of seconds above 0, ``ConfigError`` when the done set cannot expire names.
        """
        self.__core.producer.mark([task_name], True, "task_done", ttl)  # type: ignore[union-attr]

    def uncache_task(self, *task_names: str) -> None:
        """Remove names from the done set, so ``repeat=False`` tasks of those names can be added again."""
        self.__core.producer.mark(task_names, False, "uncache_task")  # type: ignore[union-attr]

    async def flush(self) -> None:
        """Write everything added outside handlers now.

        While the loop is serving, a backend outage makes this wait and retry
        (the loop is paused anyway); otherwise it raises ``BackendUnavailable``
        with the writes kept for the next try.
        """
        await self.__core.producer.flush()  # type: ignore[union-attr]

    def close(self) -> None:
        """Close what synchronous ``add_task`` calls opened (a script that only adds tasks)."""
        self.__core.producer.blocking.close()  # type: ignore[union-attr]

    async def clear_data(self, what: str = "all") -> None:
        """Delete this loop's data: ``queue`` (ready, delayed, leased), ``dead``, ``done``, ``stats`` or ``all``.

        The command line's ``clear``, for scripts. It does not check for running workers.
        """
        if what not in ("queue", "dead", "done", "stats", "all"):
            raise ValueError(f"clear_data: what must be queue, dead, done, stats or all, not {what!r}")
        core = self.__core
        assert core.store is not None and core.producer is not None
        core.producer.cache.clear()
        store = core.store
        opened_here = not store.opened
        await store.open()
        try:
            await store.clear(what)
        finally:
            if opened_here:
                await store.close()

    # -- running --------------------------------------------------------------------------

    async def run(self) -> None:
        """Seed the first tasks (master only). Optional; runs at every master start."""

    def check_html(self, text: str) -> bool:
        """Accept or reject a fetched body; a false value makes ``async_web_request`` retry.

        The default accepts everything. Overrides may be ``async def`` too.
        """
        return True

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
        core = self.__core
        if core.worker is not None:
            raise RuntimeError(f"{self.name} is already serving")
        if idle_exit is None:
            idle_exit = self.settings.loop["idle_exit"]
        else:
            idle_exit = coerce_option(LOOP_OPTIONS["idle_exit"], idle_exit, "serve(idle_exit=...)", None)
        assert core.store is not None and core.producer is not None
        worker = Worker(
            self.name, core.store, core.producer, core.handlers, self.settings.loop, self.run, core.stats
        )
        if core.http is not None:  # made before serving: its requests would miss the serve's per-host gate
            early, core.http = core.http, None
            await early.close()
        core.worker = worker
        tuned = tune_gc(self.settings.loop["tune_gc"] is True)
        try:
            summary = await worker.run(slave=slave, seed=seed, idle_exit=idle_exit, handle_signals=handle_signals)
        finally:
            tuned.restore()
            core.worker = None
            core.last_alias = worker.report.summary.alias
            http, core.http = core.http, None
            if http is not None:
                await http.close()
        return summary

    def stop(self) -> None:
        """Stop this loop gracefully. Safe from handlers, signal handlers and other threads."""
        worker = self.__core.worker
        if worker is not None:
            worker.stop()

    def run_until_idle(self, *, slave: bool = False, seed: bool = True, idle_exit: float = 0.0) -> RunSummary:
        """Run in a fresh event loop until the queue is idle (tests, scripts, benchmarks).

        The event loop is uvloop's when it is installed, unless the ``uvloop`` option is False."""
        self.close()  # what add_task opened while no event loop ran: written already, not needed now
        with asyncio.Runner(loop_factory=event_loop_factory(self.settings.loop["uvloop"])) as runner:
            return runner.run(self.serve(slave=slave, seed=seed, idle_exit=idle_exit, handle_signals=True))

    def start(self, argv: Sequence[str] | None = None) -> None:
        """The command line: ``start [-s]``, ``stop m1 …``, ``status``, ``clear``, ``dead`` (reads ``sys.argv``).

        Exits the process with 0 (ok), 1 (failure) or 2 (usage error).
        """
        from .cli import run_spider_cli

        raise SystemExit(run_spider_cli(self, argv))

    # -- HTTP -----------------------------------------------------------------------------

    async def async_web_request(self, item: Item | dict[str, Any], *, session: Any = None, **legacy: Any) -> Response:
        """One HTTP request described by ``item`` through the loop's shared aiohttp session.

        Retries connection errors, timeouts and 5xx/429 responses with backoff up to
        ``item.max_retry`` tries in total; a ``check_html(text)`` method on the loop
        may reject a body (then it retries). Returns a
        :class:`~achihuo_mini.http.Response`; raises
        :class:`~achihuo_mini.errors.RequestError` after the last try, and (``obey_robots``)
        :class:`~achihuo_mini.errors.RobotsDisallowed` for a URL robots.txt disallows. ``session``,
        ``keep_alive`` and ``check_html`` keywords of seed-era code are accepted.
        """
        core = self.__core
        http = core.http
        if http is None:
            from .http import HttpClient

            overridden = type(self).check_html is not AsyncLoop.check_html
            http = core.http = HttpClient(
                self.name,
                self.settings.loop,
                stats=core.stats if self.settings.loop["stats"] else NoStats(),
                pool_size=self.concurrency,
                headers=type(self).HTTP_HEADERS or None,
                check_html=self.check_html if overridden else None,
                hosts=core.worker.hosts if core.worker is not None else None,
            )
        return await http.request(item, session=session, **legacy)


def event_loop_factory(wanted: bool | None) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop factory when ``wanted`` (True: required), or by default when it is
    installed; None means asyncio's own. ``ConfigError`` when required and not installed."""
    if wanted is False:
        return None
    try:
        import uvloop
    except ImportError:
        if wanted:
            raise ConfigError('uvloop = true, but uvloop is not installed: pip install "achihuo_mini[fast]"') from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


GC_THRESHOLDS = (50_000, 20, 100)
"""Collector thresholds while serving with ``tune_gc``: a crawl allocates many short-lived
objects in cycles (tasks, futures, responses); collecting every 700 allocations cost ~12 %
of a crawl's CPU, most of it finding nothing to free."""


class _GcTuning:
    def __init__(self, on: bool) -> None:
        self.on = on
        self.before = gc.get_threshold()
        if on:
            gc.freeze()  # what start-up built lives as long as the process: never scan it again
            gc.set_threshold(*GC_THRESHOLDS)

    def restore(self) -> None:
        if self.on:
            gc.set_threshold(*self.before)
            gc.unfreeze()


def tune_gc(on: bool) -> _GcTuning:
    """Raise the collector's thresholds while a loop serves (``tune_gc``); ``restore()`` undoes it."""
    return _GcTuning(on)


_SET_BY_INIT = frozenset({"_AsyncLoop__core", "settings", "name", "concurrency", "debug"})

_FRAMEWORK = frozenset(name for name in dir(AsyncLoop) if not name.startswith("_")) | {
    "name",
    "settings",
    "concurrency",
    "debug",
}
"""Names the framework defines: never handlers (a task naming one is buried at once)."""
