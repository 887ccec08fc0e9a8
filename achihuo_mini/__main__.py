"""The ``achihuo`` console script (and ``python -m achihuo_mini``): manage loops by NAME, without their source.

::

    achihuo status NAME [--config FILE] [--backend NAME]
    achihuo stop NAME m1 s2 | all | masters | slaves
    achihuo clear NAME [queue|done|dead|all] --yes
    achihuo dead NAME [--limit N] [--requeue]
    achihuo web NAME [--bind 127.0.0.1:8080] [--token TOKEN]   # a live status page
    achihuo backends          # the installed backend plugins
    achihuo loops             # the loops that have data in a backend
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from .async_loop import AsyncLoop
from .cli import _Parser, add_admin_commands, run_command, version
from .config import load_settings
from .errors import AchihuoError
from .plugins import registry

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """The ``achihuo`` console script; returns the exit code."""
    parser = _Parser(prog="achihuo", description="Manage achihuo_mini loops without their source.")
    parser.add_argument("--version", action="version", version=f"achihuo_mini {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("backends", help="list installed backend plugins")
    loops = sub.add_parser("loops", help="list the loops (NAMEs) that have data in a backend")
    loops.add_argument("--backend", help="the backend to look in (else the config file's [queue], else sqlite)")
    loops.add_argument("--config", help="TOML config file (its [queue] section says where to look)")
    add_admin_commands(sub, named=True)
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
    args.config = args.backend = None  # already applied
    return run_command(loop, args)


def _list_loops(backend: str | None, config: str | None) -> int:
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


if __name__ == "__main__":
    raise SystemExit(main())
