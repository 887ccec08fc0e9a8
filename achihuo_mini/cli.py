"""The command line: ``python spider.py start|stop|status|clear|dead`` (and, through
:mod:`achihuo_mini.__main__`, the ``achihuo`` script).

It uses a loop only through its public surface (``name``, ``settings``, ``configure``,
``serve``); admin commands open the loop's store themselves. Exit codes: 0 ok,
1 failure, 2 usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any, Protocol

from ._report import RunSummary, printable, stats_lines, status_data
from ._store import Store
from ._web import resolve_targets
from .backend import DeadLetter, WorkerInfo
from .codec import decode_task
from .errors import AchihuoError, DecodeError
from .masking import mask_secrets

__all__ = ["Spider", "add_admin_commands", "run_command", "run_spider_cli", "setup_logging"]

log = logging.getLogger("achihuo_mini")

CLEAR_TARGETS = ("queue", "done", "dead", "stats", "all", "cache")


class Spider(Protocol):
    """What the command line needs of a loop."""

    name: str
    settings: Any

    def configure(self, **cli_options: Any) -> None: ...

    async def serve(
        self, *, slave: bool = ..., seed: bool = ..., idle_exit: float | None = ..., handle_signals: bool = ...
    ) -> RunSummary: ...


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("achihuo_mini")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # usage errors exit 2, as argparse does, with our wording
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", help="backend of both queue and done set (overrides the config file)")
    p.add_argument("--config", help="TOML config file")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log level")


def _add_start(sub: Any) -> None:
    start = sub.add_parser("start", help="run a worker (master unless -s)", description="Run a worker of this loop.")
    start.add_argument("-s", "--slave", action="store_true", help="consume only; do not call run()")
    start.add_argument("--no-run", action="store_true", help="master that resumes without calling run()")
    start.add_argument("--idle-exit", type=float, metavar="SECONDS", help="exit when the queue is idle this long")
    start.add_argument("-c", "--concurrency", type=int, help="handlers running at once")
    start.add_argument("--metrics", metavar="HOST:PORT", help="serve this worker's Prometheus /metrics there")
    _common(start)


def add_admin_commands(sub: Any, named: bool = False) -> None:
    """The commands that manage a loop; ``named`` (the achihuo script) adds a NAME argument."""

    def add(command: str, **kw: Any) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(command, **kw)
        if named:
            p.add_argument("name", help="the loop's NAME")
        _common(p)
        return p

    stop = add("stop", help="stop workers gracefully (m1 s2 | all | masters | slaves)")
    stop.add_argument("targets", nargs="+", help="aliases such as m1 or s2, or all, masters, slaves")
    stop.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for them to exit (default 60)")

    status = add("status", help="workers, queue and done set")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    clear = add("clear", help="delete data: queue, done, dead, stats or all (default all)")
    clear.add_argument("what", nargs="?", default="all", choices=CLEAR_TARGETS)
    clear.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    clear.add_argument("--force", action="store_true", help="clear even while workers are registered")

    dead = add("dead", help="list dead letters, show one with --show ID, or requeue them with --requeue")
    dead.add_argument("--limit", type=int, help="how many to list (default 20) or requeue (default all)")
    what = dead.add_mutually_exclusive_group()
    what.add_argument("--requeue", action="store_true", help="put dead letters back in the queue (oldest first)")
    what.add_argument("--show", type=int, metavar="ID", help="print one dead letter whole, its traceback included")

    web = add("web", help="serve a live status page of the loop (read-only unless --token)")
    web.add_argument("--bind", default="127.0.0.1:8080", metavar="HOST:PORT",
                     help="where to listen (default 127.0.0.1:8080; port 0 takes a free one)")  # fmt: skip
    web.add_argument("--token", default=os.environ.get("ACHIHUO_WEB_TOKEN") or None,
                     help="allow stop and requeue to requests carrying it (Authorization: Bearer TOKEN); "
                     "default: $ACHIHUO_WEB_TOKEN, else read-only")  # fmt: skip
    web.add_argument("--interval", type=float, default=2.0, metavar="SECONDS",
                     help="seconds between the page's refreshes and the chart's samples (default 2)")  # fmt: skip


def setup_logging(level: str | None, default: str) -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)-7s %(message)s", stream=sys.stderr)
    logging.getLogger("achihuo_mini").setLevel(level or default)


def run_spider_cli(loop: Spider, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the command for ``loop``; return the exit code."""
    prog = sys.argv[0] if sys.argv and sys.argv[0] else type(loop).__name__
    parser = _Parser(prog=prog, description=f"achihuo_mini loop {loop.name!r}")
    parser.add_argument("--version", action="version", version=f"achihuo_mini {version()}")
    sub = parser.add_subparsers(dest="command", metavar="{start,stop,status,clear,dead,web}", required=True)
    _add_start(sub)
    add_admin_commands(sub)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.command == "start" and args.slave and args.no_run:
        parser.error("--no-run is for masters; a slave never calls run()")
    return run_command(loop, args)


def run_command(loop: Spider, args: argparse.Namespace) -> int:
    """Run a parsed command for ``loop``."""
    try:
        options: dict[str, Any] = {"config": args.config, "backend": args.backend, "log_level": args.log_level}
        if args.command == "start":
            options.update(concurrency=args.concurrency, idle_exit=args.idle_exit, metrics=args.metrics)
        if any(v is not None for v in options.values()):
            loop.configure(**options)
        level = loop.settings.loop["log_level"]
        if args.command == "start":
            if loop.settings.loop["tune_gc"] is None:  # start() owns its process: tune the collector
                loop.configure(**options, tune_gc=True)
            setup_logging(level, "DEBUG" if loop.settings.loop["debug"] else "INFO")
            from .async_loop import event_loop_factory

            factory = event_loop_factory(loop.settings.loop["uvloop"])
            with asyncio.Runner(loop_factory=factory) as runner:
                summary = runner.run(
                    loop.serve(slave=args.slave, seed=not args.no_run, idle_exit=None, handle_signals=True)
                )
            return summary.exit_code
        setup_logging(level, "WARNING")  # an admin command prints its answer, not the backend's chatter
        return asyncio.run(_admin(loop, args))
    except AchihuoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


ADMIN_CALL_TIMEOUT = 300.0  # a clear of millions of tasks takes a while; a hung backend must not hang for ever
WEB_CALL_TIMEOUT = 15.0  # a page request waits at most this long for the backend, then says it cannot read it


async def _admin(loop: Spider, args: argparse.Namespace) -> int:
    timeout = WEB_CALL_TIMEOUT if args.command == "web" else ADMIN_CALL_TIMEOUT
    store = Store(loop.name, loop.settings, call_timeout=timeout)
    if await store.has_data() is False:  # never create a store for a misspelled NAME
        settings = store.settings
        where = f"--config {settings.config_path}" if settings.config_path else f"--backend {settings.queue.backend}"
        nothing = f"no data for loop {printable(loop.name)!r} at {store.where()} (it never ran there, or was cleared)"
        if args.command == "clear":  # the wish is granted already
            print(f"nothing to clear: {nothing}")
            return 0
        print(f"{nothing}; `achihuo loops {where}` lists the loops that have data", file=sys.stderr)
        return 1
    await store.open()
    try:
        if args.command == "stop":
            return await _stop(store, args.targets, args.timeout)
        if args.command == "status":
            return await _status(loop.name, store, args.json)
        if args.command == "clear":
            return await _clear(loop.name, store, args.what, args.yes, args.force)
        if args.command == "dead":
            if args.show is not None:
                return await _show_dead(store, args.show)
            return await _dead(store, args.limit, args.requeue)
        if args.command == "web":
            from ._web import serve_web

            return await serve_web(loop.name, store, args.bind, args.token, args.interval)
        raise AssertionError(args.command)
    finally:
        await store.close()


def _identity(w: WorkerInfo) -> tuple[Any, Any] | None:
    """The process behind a registration (host, pid), when it published one."""
    info = w.info if isinstance(w.info, dict) else {}
    host, pid = info.get("host"), info.get("pid")
    return (host, pid) if isinstance(host, str) and type(pid) is int else None


def _alive_here(w: WorkerInfo) -> bool:
    """Is the process behind ``w`` still running on this host (declared dead, not yet re-registered)?"""
    identity = _identity(w)
    if identity is None or identity[0] != socket.gethostname():
        return False  # another host's process: its registration is all we can see
    pid = identity[1]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass  # it exists (owned by someone else)
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2][1:2] != b"Z"  # exited, not yet reaped by its parent
    except OSError:
        return True


async def _stop(store: Store, targets: Sequence[str], timeout: float) -> int:
    reg = store.registry
    if reg is None:
        print(
            f"error: the {store.settings.queue.backend!r} queue has no worker registry; stop workers with SIGTERM",
            file=sys.stderr,
        )
        return 1
    workers = [w for w in await reg.workers() if isinstance(w, WorkerInfo)]
    by_alias = {w.alias: w for w in workers}
    chosen, unknown = resolve_targets(workers, targets)
    for alias in unknown:
        registered = ", ".join(printable(a, 20) for a in by_alias) or "none"
        print(f"{printable(alias, 20)}: no such worker (registered: {registered})", file=sys.stderr)
    if not chosen:
        if not unknown:
            print("no workers are registered")
        return 1 if unknown else 0
    sent = await reg.send(chosen, "stop")
    # follow each process, not only its registration: a worker that re-registers (after a
    # long pause) is the same process under a new id, and gets the stop again
    targets_left = {a: by_alias[a] for a in sent}
    print(f"stop sent to {', '.join(printable(a, 20) for a in sent)}; waiting up to {timeout:g} s")
    deadline = time.monotonic() + timeout
    while targets_left and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        present = [w for w in await reg.workers() if isinstance(w, WorkerInfo)]
        for alias, w in list(targets_left.items()):
            same = [
                p
                for p in present
                if p.worker == w.worker or (_identity(w) is not None and _identity(p) == _identity(w))
            ]
            if not same:
                if not _alive_here(w):  # declared dead but still running here: it will register again
                    print(f"{printable(alias, 20)}: stopped")
                    del targets_left[alias]
            elif all(p.worker != w.worker for p in same):
                again = same[0]
                await reg.send([again.alias], "stop")  # the same process, re-registered
                targets_left[alias] = again
    for alias in targets_left:
        print(f"{printable(alias, 20)}: still running after {timeout:g} s", file=sys.stderr)
    return 1 if targets_left or unknown else 0


async def _status(name: str, store: Store, as_json: bool) -> int:
    data = await status_data(name, store)
    if as_json:
        print(json.dumps(data, indent=2))
        return 0
    q, d = data["queue"], data["done"]
    print(f"loop {printable(data['name'])!r}")
    print(
        f"queue: {q['backend']} at {q['location']}" + (f" (durability: {q['durability']})" if q["durability"] else "")
    )
    print(f"  ready {q['ready']}  delayed {q['delayed']}  leased {q['leased']}  dead {q['dead']}")
    print(f"done set: {d['backend']} at {d['location']}: {d['count']} names")
    rows = [["id", "role", "host", "pid", "state", "running", "ok", "failed", "tasks/s", "heartbeat"]]
    for w in data["workers"]:
        age = w["last_heartbeat_s"]
        rows.append(
            [str(w[k]) for k in ("alias", "role", "host", "pid", "state", "running", "succeeded", "failed", "rate")]
            + [f"{age:.1f}s ago" if age is not None else "?"]
        )
    rate = sum(w["rate"] or 0 for w in data["workers"])
    print(f"throughput: {rate:.1f} tasks/s (all workers, last minute)")
    if len(rows) == 1:
        print("workers: none")
    else:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        print("workers:")
        for r in rows:
            print("  " + "  ".join(cell.ljust(width) for cell, width in zip(r, widths, strict=True)))
    for line in stats_lines(data["stats"]):
        print(line)
    return 0


async def _clear(name: str, store: Store, what: str, yes: bool, force: bool) -> int:
    what = "done" if what == "cache" else what
    reg = store.registry
    if reg is not None and not force:
        workers = [w for w in await reg.workers() if isinstance(w, WorkerInfo)]
        if workers:
            print(
                f"refusing to clear: {len(workers)} workers are registered "
                f"({', '.join(printable(w.alias, 20) for w in workers)}); stop them or use --force",
                file=sys.stderr,
            )
            return 1
    if not yes:
        if not sys.stdin.isatty():
            print("refusing to clear without confirmation: use --yes", file=sys.stderr)
            return 1
        answer = await asyncio.to_thread(input, f"clear {what} of loop {name!r}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing cleared")
            return 1
    await store.clear(what)
    print(f"cleared {what} of loop {name!r}")
    return 0


def _task_of(letter: DeadLetter) -> tuple[str, Any]:
    """``handler(name)`` of a dead letter, and its decoded task (None when it does not decode)."""
    try:
        task = decode_task(letter.payload)
    except DecodeError:
        size = len(letter.payload) if isinstance(letter.payload, bytes) else "?"
        return f"<undecodable {size} bytes>", None
    name = mask_secrets(task.name) if task.name is not None else None
    return f"{printable(task.handler, 60)}({name!r})", task


async def _dead(store: Store, limit: int | None, requeue: bool) -> int:
    if limit is not None and limit < 0:
        print("error: --limit must be 0 or more", file=sys.stderr)
        return 2
    if requeue:
        n = await store.requeue_dead(limit)
        print(f"requeued {n} dead letters")
        return 0
    letters = await store.dead_letters(20 if limit is None else limit)
    for letter in letters:
        what, _ = _task_of(letter)
        first_line = letter.error.splitlines()[0] if isinstance(letter.error, str) and letter.error else ""
        print(f"{letter.task_id}  {printable(what)}  failures={letter.failures}  {printable(first_line)}")
    if not letters:
        print("no dead letters")
    elif len(letters) == (20 if limit is None else limit):
        total = (await store.stats()).dead
        if total > len(letters):
            print(f"... {total - len(letters)} more (--limit N lists more); `dead --show ID` prints one whole")
    return 0


SHOW_SCAN = 100_000
"""How many dead letters (oldest first) ``dead --show`` looks through for an id."""


async def _show_dead(store: Store, task_id: int) -> int:
    letter = next((x for x in await store.dead_letters(SHOW_SCAN) if x.task_id == task_id), None)
    if letter is None:
        print(f"error: no dead letter {task_id} (among the oldest {SHOW_SCAN}); `dead` lists them", file=sys.stderr)
        return 1
    what, task = _task_of(letter)
    print(f"dead letter {letter.task_id}: {printable(what)}")
    if task is not None:
        print(f"  handler:  {printable(task.handler)}")
        print(f"  name:     {printable(mask_secrets(task.name)) if task.name is not None else None}")
        print(f"  args:     {printable(mask_secrets(repr(list(task.args))), 2000)}")
    print(f"  failures: {letter.failures}")
    print("  error:")
    for line in (letter.error if isinstance(letter.error, str) else repr(letter.error)).splitlines():
        print(f"    {printable(line, 1000)}")
    return 0
