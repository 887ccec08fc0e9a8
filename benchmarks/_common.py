"""Helpers shared by the benchmark scripts (not a benchmark itself)."""

from __future__ import annotations

import os
import platform
import time
import uuid
from pathlib import Path

from achihuo_mini import AsyncLoop
from achihuo_mini._store import Store

DEFAULT_REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


class NoOp(AsyncLoop):
    NAME = "bench"

    async def noop(self, i: int) -> None:
        pass


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def write_config(path: Path, backend: str, redis_url: str = DEFAULT_REDIS_URL, sqlite_path: Path | None = None) -> Path:
    """A config file with ``backend`` on both sides (so ``$ACHIHUO_CONFIG`` cannot change the run)."""
    opts = {"redis": f'url = "{redis_url}"', "sqlite": f'path = "{sqlite_path}"'}.get(backend, "")
    path.write_text(f'[queue]\nbackend = "{backend}"\n{opts}\n[done]\nbackend = "{backend}"\n{opts}\n')
    return path


def make_loop(name: str, config: Path, concurrency: int = 32) -> AsyncLoop:
    """A no-op loop with its own NAME, no progress lines and no debug logging."""
    cls = type("NoOp", (NoOp,), {"NAME": name})
    loop: AsyncLoop = cls(concurrency=concurrency, config_file=config, debug=False, progress_interval=0)
    return loop


def store_of(loop: AsyncLoop) -> Store:
    """The loop's queue and done set (as its settings say), opened to look at or clear."""
    return Store(loop.name, loop.settings)  # an async context manager: opened on entry, closed on exit


def machine() -> str:
    return (
        f"{platform.python_implementation()} {platform.python_version()}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}"
    )


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
