"""The command line: ``python spider.py start|stop|status|clear|dead`` and the ``achihuo`` script.

Exit codes: 0 ok, 1 failure, 2 usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .backend import WorkerRegistry
from .codec import decode_task
from .errors import AchihuoError, DecodeError
from .http import mask_secrets

if TYPE_CHECKING:
    from .async_loop import AsyncLoop

__all__ = ["main", "run_spider_cli"]

log = logging.getLogger("achihuo_mini")

CLEAR_TARGETS = ("queue", "done", "dead", "all", "cache")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # usage errors exit 2, as argparse does, with our wording
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_commands(sub: Any, named: bool = False) -> None:
    """Add the commands to ``sub``; ``named`` (the achihuo script) adds a NAME argument and no ``start``."""

    def add(command: str, **kw: Any) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(command, **kw)
        if named:
            p.add_argument("name", help="the loop's NAME")
            p.add_argument("--backend", help="backend of both sides (else the config file, else sqlite)")
        return p

    if not named:
        _add_start(sub)
    _add_admin(add)


def _add_start(sub: Any) -> None:
    start = sub.add_parser("start", help="run a worker (master unless -s)", description="Run a worker of this loop.")
    start.add_argument("-s", "--slave", action="store_true", help="consume only; do not call run()")
    start.add_argument("--no-run", action="store_true", help="master that resumes without calling run()")
    start.add_argument("--idle-exit", type=float, metavar="SECONDS", help="exit when the queue is idle this long")
    start.add_argument("--backend", help="backend for both queue and done set (overrides everything else)")
    start.add_argument("-c", "--concurrency", type=int, help="handlers running at once")
    start.add_argument("--config", help="TOML config file")
    start.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log level")


def _add_admin(add: Any) -> None:
    stop = add("stop", help="stop workers gracefully (m1 s2 | all | masters | slaves)")
    stop.add_argument("targets", nargs="+", help="aliases such as m1 or s2, or all, masters, slaves")
    stop.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for them to exit (default 60)")
    stop.add_argument("--config", help="TOML config file")

    status = add("status", help="workers, queue and done set")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--config", help="TOML config file")

    clear = add("clear", help="delete data: queue, done, dead or all (default all)")
    clear.add_argument("what", nargs="?", default="all", choices=CLEAR_TARGETS)
    clear.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    clear.add_argument("--force", action="store_true", help="clear even while workers are registered")
    clear.add_argument("--config", help="TOML config file")

    dead = add("dead", help="list dead letters, or requeue them with --requeue")
    dead.add_argument("--limit", type=int, default=20, help="how many to list (default 20)")
    dead.add_argument("--requeue", action="store_true", help="put every dead letter back in the queue")
    dead.add_argument("--config", help="TOML config file")


def _setup_logging(level: str | None, debug: bool) -> None:
    chosen = level or ("DEBUG" if debug else "INFO")
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)-7s %(message)s", stream=sys.stderr)
    logging.getLogger("achihuo_mini").setLevel(chosen)


def run_spider_cli(loop: AsyncLoop, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the command for ``loop``; return the exit code."""
    prog = sys.argv[0] if sys.argv and sys.argv[0] else type(loop).__name__
    parser = _Parser(prog=prog, description=f"achihuo_mini loop {loop.name!r}")
    sub = parser.add_subparsers(dest="command", metavar="{start,stop,status,clear,dead}", required=True)
    _add_commands(sub)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.command == "start" and args.slave and args.no_run:
        parser.error("--no-run is for masters; a slave never calls run()")
    return _run(loop, args)


def _run(loop: AsyncLoop, args: argparse.Namespace) -> int:
    try:
        cli: dict[str, Any] = {"config": getattr(args, "config", None)}
        if args.command == "start":
            cli.update(backend=args.backend, concurrency=args.concurrency, log_level=args.log_level)
        if any(v is not None for v in cli.values()):
            loop._configure({k: v for k, v in cli.items() if v is not None})
        _setup_logging(loop.settings.loop["log_level"], loop.debug)
        if args.command == "start":
            summary = asyncio.run(
                loop.serve(slave=args.slave, seed=not args.no_run, idle_exit=args.idle_exit, handle_signals=True)
            )
            return summary.exit_code
        return asyncio.run(_admin(loop, args))
    except AchihuoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


async def _admin(loop: AsyncLoop, args: argparse.Namespace) -> int:
    await loop._open()
    try:
        if args.command == "stop":
            return await _stop(loop, args.targets, args.timeout)
        if args.command == "status":
            return await _status(loop, args.json)
        if args.command == "clear":
            return await _clear(loop, args.what, args.yes, args.force)
        if args.command == "dead":
            return await _dead(loop, args.limit, args.requeue)
        raise AssertionError(args.command)
    finally:
        await loop._close_backends()


def _registry(loop: AsyncLoop) -> WorkerRegistry | None:
    q = loop._queue
    return q if isinstance(q, WorkerRegistry) else None


async def _stop(loop: AsyncLoop, targets: Sequence[str], timeout: float) -> int:
    reg = _registry(loop)
    if reg is None:
        print(
            f"error: the {loop.settings.queue.backend!r} queue has no worker registry; stop workers with SIGTERM",
            file=sys.stderr,
        )
        return 1
    workers = await reg.workers()
    by_alias = {w.alias: w for w in workers}
    chosen: list[str] = []
    unknown: list[str] = []
    for target in targets:
        if target == "all":
            chosen += list(by_alias)
        elif target in ("masters", "slaves"):
            chosen += [w.alias for w in workers if w.role == target[:-1]]
        elif target in by_alias:
            chosen.append(target)
        else:
            unknown.append(target)
    chosen = list(dict.fromkeys(chosen))
    for alias in unknown:
        print(f"{alias}: no such worker (registered: {', '.join(by_alias) or 'none'})", file=sys.stderr)
    if not chosen:
        if not unknown:
            print("no workers are registered")
        return 1 if unknown else 0
    sent = await reg.send(chosen, "stop")
    ids = {by_alias[a].worker: a for a in sent}
    print(f"stop sent to {', '.join(sent)}; waiting up to {timeout:g} s")
    deadline = time.monotonic() + timeout
    remaining = set(ids)
    while remaining and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        present = {w.worker for w in await reg.workers()}
        for wid in sorted(remaining - present):
            print(f"{ids[wid]}: stopped")
        remaining &= present
    for wid in sorted(remaining):
        print(f"{ids[wid]}: still running after {timeout:g} s", file=sys.stderr)
    return 1 if remaining or unknown else 0


async def status_data(loop: AsyncLoop) -> dict[str, Any]:
    """What ``status`` prints, as data."""
    stats = await loop._queue.stats()
    reg = _registry(loop)
    workers = await reg.workers() if reg is not None else []
    return {
        "name": loop.name,
        "queue": {
            "backend": loop.settings.queue.backend,
            "location": loop._queue.location,
            "ready": stats.ready,
            "delayed": stats.delayed,
            "leased": stats.leased,
            "dead": stats.dead,
            "durability": getattr(loop._queue, "durability", None),
        },
        "done": {
            "backend": loop.settings.done.backend,
            "location": loop._done.location,
            "count": await loop._done.count(),
        },
        "workers": [
            {
                "alias": w.alias,
                "role": w.role,
                "worker": w.worker,
                "host": w.info.get("host"),
                "pid": w.info.get("pid"),
                "state": w.info.get("state"),
                "running": w.info.get("running"),
                "succeeded": w.info.get("succeeded"),
                "failed": w.info.get("failed"),
                "rate": w.info.get("rate"),
                "last_heartbeat_s": round(w.age, 1),
            }
            for w in workers
        ],
    }


async def _status(loop: AsyncLoop, as_json: bool) -> int:
    data = await status_data(loop)
    if as_json:
        print(json.dumps(data, indent=2))
        return 0
    q, d = data["queue"], data["done"]
    print(f"loop {data['name']!r}")
    print(
        f"queue: {q['backend']} at {q['location']}" + (f" (durability: {q['durability']})" if q["durability"] else "")
    )
    print(f"  ready {q['ready']}  delayed {q['delayed']}  leased {q['leased']}  dead {q['dead']}")
    print(f"done set: {d['backend']} at {d['location']}: {d['count']} names")
    rows = [["id", "role", "host", "pid", "state", "running", "ok", "failed", "tasks/s", "heartbeat"]]
    for w in data["workers"]:
        rows.append(
            [str(w[k]) for k in ("alias", "role", "host", "pid", "state", "running", "succeeded", "failed", "rate")]
            + [f"{w['last_heartbeat_s']:.1f}s ago"]
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
    return 0


async def _clear(loop: AsyncLoop, what: str, yes: bool, force: bool) -> int:
    what = "done" if what == "cache" else what
    reg = _registry(loop)
    if reg is not None and not force:
        workers = await reg.workers()
        if workers:
            print(
                f"refusing to clear: {len(workers)} workers are registered "
                f"({', '.join(w.alias for w in workers)}); stop them or use --force",
                file=sys.stderr,
            )
            return 1
    if not yes:
        if not sys.stdin.isatty():
            print("refusing to clear without confirmation: use --yes", file=sys.stderr)
            return 1
        answer = await asyncio.to_thread(input, f"clear {what} of loop {loop.name!r}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing cleared")
            return 1
    await loop.clear_data(what)
    print(f"cleared {what} of loop {loop.name!r}")
    return 0


async def _dead(loop: AsyncLoop, limit: int, requeue: bool) -> int:
    if requeue:
        n = await loop._queue.requeue_dead()
        print(f"requeued {n} dead letters")
        return 0
    for letter in await loop._queue.dead_letters(limit):
        try:
            task = decode_task(letter.payload)
            what = f"{task.handler}({mask_secrets(task.name) if task.name is not None else None!r})"
        except DecodeError:
            what = f"<undecodable {len(letter.payload)} bytes>"
        last_line = letter.error.splitlines()[-1] if letter.error else ""
        print(f"{letter.task_id}  {what}  failures={letter.failures}  {last_line}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The ``achihuo`` console script: manage a loop by NAME without the spider's source."""
    from .async_loop import AsyncLoop
    from .plugins import registry

    parser = _Parser(prog="achihuo", description="Manage achihuo_mini loops without their source.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("backends", help="list installed backend plugins")
    loops = sub.add_parser("loops", help="list the loops (NAMEs) that have data in a backend")
    loops.add_argument("--backend", help="the backend to look in (else the config file's [queue], else sqlite)")
    loops.add_argument("--config", help="TOML config file (its [queue] section says where to look)")
    _add_commands(sub, named=True)
    args = parser.parse_args(argv)
    if args.command == "backends":
        for spec in registry.specs():
            print(f"{spec.name:10} {spec.scope:8} {spec.plugin:12} {spec.description}")
        for name, error in registry.failed().items():
            print(f"{name:10} FAILED   {error}")
        return 0
    if args.command == "loops":
        return _list_loops(args.backend, args.config)
    try:
        cls = type("NamedLoop", (AsyncLoop,), {"NAME": args.name})
        loop = cls(cache_backend=args.backend, config_file=args.config, debug=False)
    except AchihuoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    args.config = None
    return _run(loop, args)


def _list_loops(backend: str | None, config: str | None) -> int:
    from .config import load_settings

    try:
        side = load_settings(kwargs={}, cache_backend=backend, config_file=config).queue
        spec = side.spec()
        if spec.list_loops is None:
            print(f"error: the {spec.name} backend cannot list its loops", file=sys.stderr)
            return 1
        names = asyncio.run(spec.list_loops(dict(side.options)))
    except AchihuoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name in names:
        print(name)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
